"""Near-duplicate retrieval through the command line: features x encodings x compression.

    python benchmarks/bench_retrieval.py [--data ../shared/data/scene15] [--cache bench-retrieval-cache]
        [--seed 0] [--only PATTERN ...] [--add CONFIGS.json] [--top 100] [--repeat 5] [--set scene15|demo]
        [--list] [--out FILE]

**The set** (written once into ``--cache``, deterministic from ``--seed``). From the
15-Scene ``test/`` photos (2,969 grey 200 x 200 JPEGs in 15 class folders): a database of
``--database`` (1,200) photos, the same number from each class (80), drawn at random; and
``--queries`` (80) of them attacked, 5 or 6 per class, each attacked once:

* a crop keeping 50-70% of the side (the same fraction for both sides), at a random place,
  **rotated** by up to +/-25 degrees: the window is a rotated rectangle lying wholly inside
  the photo, resampled upright with ``cv2.warpAffine`` (bilinear), so there are no borders
  to fill;
* **scaled** by 0.6-1.4 (``cv2.resize``: area averaging below 1, bicubic above), so queries
  are 60 to 196 pixels on a side;
* for half of them (40, chosen at random), a **Gaussian blur** of sigma 1.5-2.5;
* stored as **JPEG of quality 10-25** (``cv2.imencode``; the file is that encoding).

Each query's only positive is its source photo. The cache folder then holds
``database/<class>/<name>.jpg`` (byte copies of the chosen photos), ``queries/<class>/<name>.jpg``
(the attacked copy of ``database/<class>/<name>.jpg``: same relative path),
``ground_truth.json`` (query path -> database path, relative to the cache folder),
``attacks.json`` (each query's crop, angle, scale, blur and quality) and ``set.json`` (the
parameters; a cache holding another set is refused rather than overwritten).
``--set demo`` builds vladkit demo's set instead, in ``<cache>/demo/``
(:func:`vladkit.datasets.near_duplicate_set` on :func:`vladkit.datasets.demo_photos`: 23
originals and 69 mirrored-crop distractors in the database, the 7 attacks of each original
as queries, PNG files; and its 736 grey learning crops in ``learning/``, on which the
vocabularies, PCA and quantizers are then learnt, as the demo does).

**The protocol**: every step is a ``python -m vladkit`` command run in the cache folder,
as a user would type it. For each configuration: ``vocab build database`` (the
vocabulary is learnt on the database photos -- the queries' originals, never the attacked
queries -- ``--max-descriptors 200000 --seed 0``),
``encode database`` and ``encode queries`` (``-o X.npz``), ``index build`` (exact; or
``--pca 256 --pq 64x8``: PCA-whitening with the default exponent 0.5, learnt on the
database vectors, then a 64-byte product-quantized code), and ``search INDEX QUERIES...
--top R --json``. From the JSON the script computes, with the single positive at rank r
(1-based) in the top R: recall@1 (r = 1), recall@10 (r <= 10) and mAP, the mean over
queries of AP = 1/r (0 when the positive is not in the top R). (That is the
non-interpolated AP, i.e. the mean reciprocal rank; ``vladkit evaluate`` and the demo use
the Holidays trapezoidal AP, which for one positive at rank r > 1 is 1/(2r).)
**ms/query** is the marginal cost of a query: (wall time of ``search`` with all queries -
wall time with the first query alone) / (queries - 1), each the median of ``--repeat``
(5) runs, so the command's fixed cost (starting Python, importing vladkit, loading the
index: printed below the table, with the same in CPU time) is left out; it covers reading,
extracting, encoding and searching one query. On a busy machine it is noisy (+/- several
ms: a difference of two ~3 s commands, divided by 79).
**bytes/image** is what ``index build`` reports. With 80 queries a query is 0.0125 of a
recall, and a recall near 0.7 has a binomial standard error of about 0.05: rows a few
hundredths apart are not distinguishable (``--queries`` makes more).

For exact indexes the script also ranks the ``encode queries`` vectors against the
``encode database`` ones itself and checks that ``search`` found the same first result
(it encodes query images as ``encode`` does).

**Configurations are data** (``CONFIGURATIONS``: one dict per table row, the options of each
step), so a row is added without code: ``--add FILE`` reads more of them from a JSON list.
Keys: ``name`` (what ``--only`` matches, shell-style patterns), ``vocabs`` (a list of
option lists, one ``vocab build`` each; ``encode`` gets one ``--vocab FILE`` per
vocabulary, in order: room for multi-vocabulary encodings), ``encode``, ``index``,
``search`` (option lists for those commands; ``--top`` and ``--json`` are the script's).
For example, with ``python benchmarks/bench_retrieval.py --add more.json --only '*-w0.25'``::

    [{"name": "dense-vlad64-pq64-w0.25",
      "vocabs": [["--root", "-k", "64", "--max-descriptors", "200000", "--seed", "0"]],
      "index": ["--pca", "256", "--whiten", "0.25", "--pq", "64x8"]}]

or spatial re-ranking and query expansion::

    {"name": "dense-vlad256-pq64-rerank100", "vocabs": [["--root", "-k", "256", ...]],
     "index": ["--pca", "256", "--pq", "64x8", "--rerank-features"], "search": ["--rerank", "100"]}
    {"name": "sift-fv64-exact-qe2", "vocabs": [[...]], "search": ["--qe", "2"]}

(``encode`` takes one ``--vocab`` today: several vocabularies, ``MultiVocabulary``, are
API only, so a row with two ``vocabs`` waits for the command line to accept them.)

**Montage**: ``--montage FILE.png`` draws, for six queries of the first configuration run
that re-ranks, the top 5 of its index searched without and with re-ranking, the copy's
original framed in green (the README's figure).

**Caching**: every output lands in ``<cache>/steps/``, named by a hash of the set and of
the options that produced it (and of its inputs), next to a ``.json`` record of the command,
its wall time and output, written when the step succeeded. A rerun skips finished steps,
configurations sharing a vocabulary or encodings compute them once, and an interrupted
``encode`` resumes from its shards. Delete ``steps/`` to measure again. There is no
locking: two runs on one cache at the same time may compute a step twice, or collide in
an ``encode``'s shards. The table is
printed and written to ``<cache>/results.md`` (or ``--out``).

Configurations: dense RootSIFT (``--root``, vladkit's dense default: step 4, sizes 4/6/8/10)
or sparse RootSIFT (``--features sift --root``); VLAD K=64, VLAD K=256 (k-means words)
or Fisher vectors K=64 (``--kind gmm``: PCA-64 descriptors); exact or PCA-256 + PQ 64x8.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from vladkit.pipeline.recipe import describe_extractor
from vladkit.retrieval.rerank import default_rerank_extractor

SET_VERSION = 1
STEPS = "steps"

# ------------------------------------------------------------------ configurations

VOCAB_SAMPLE = ["--max-descriptors", "200000", "--seed", "0"]
FEATURES = {"dense": ["--root"], "sift": ["--features", "sift", "--root"]}
ENCODINGS = {"vlad64": ["-k", "64"], "vlad256": ["-k", "256"], "fv64": ["-k", "64", "--kind", "gmm"]}
INDEXES = {"exact": [], "pq64": ["--pca", "256", "--pq", "64x8"]}

#: One dict per table row. "vocabs": one option list per `vocab build` (run on database/);
#: "encode", "index", "search": options added to those commands.
CONFIGURATIONS = [
    {"name": f"{features}-{encoding}-{index}",
     "vocabs": [[*FEATURES[features], *ENCODINGS[encoding], *VOCAB_SAMPLE]],
     "encode": [],
     "index": list(INDEXES[index]),
     "search": []}
    for features in FEATURES for encoding in ENCODINGS for index in INDEXES
] + [
    # Spatial re-ranking of the top 100 (the index keeps sparse RootSIFT of its images).
    {"name": f"{features}-{encoding}-pq64-rerank100",
     "vocabs": [[*FEATURES[features], *ENCODINGS[encoding], *VOCAB_SAMPLE]],
     "encode": [],
     "index": [*INDEXES["pq64"], "--rerank-features"],
     "search": ["--rerank", "100"]}
    for features, encoding in (("dense", "vlad256"), ("sift", "vlad256"), ("sift", "fv64"))
] + [
    # Deeper: the 64-byte index has more of the copies in its top 200 than in its top 100.
    {"name": "dense-vlad256-pq64-rerank200",
     "vocabs": [[*FEATURES["dense"], *ENCODINGS["vlad256"], *VOCAB_SAMPLE]],
     "encode": [], "index": [*INDEXES["pq64"], "--rerank-features"], "search": ["--rerank", "200"]},
    # Re-ranking on top of exact global vectors.
    {"name": "sift-fv64-exact-rerank100",
     "vocabs": [[*FEATURES["sift"], *ENCODINGS["fv64"], *VOCAB_SAMPLE]],
     "encode": [], "index": ["--rerank-features"], "search": ["--rerank", "100"]},
] + [
    {"name": "sift-fv64-exact-qe2", "vocabs": [[*FEATURES["sift"], *ENCODINGS["fv64"], *VOCAB_SAMPLE]],
     "encode": [], "index": [], "search": ["--qe", "2"]},
] + [
    # Selective match kernels over an inverted file: ASMK* ("bits": 128 sign bits per word)
    # and ASMK ("float": unit residuals), large k-means codebooks (faiss's k-means), the whole
    # sample of the database's sparse RootSIFT.
    {"name": f"sift-asmk-{signatures}{words // 1024}k" + ("-rerank100" if rerank else ""),
     "vocabs": [[*FEATURES["sift"], "-k", str(words), "--max-descriptors", "1000000", "--seed", "0"]],
     "encode": ["--encoder", "asmk", *([] if signatures == "bits" else ["--signatures", "float"])],
     "index": ["--rerank-features"] if rerank else [], "search": ["--rerank", "100"] if rerank else []}
    for signatures, words, rerank in (("bits", 4096, False), ("float", 4096, False), ("bits", 16384, False),
                                      ("float", 16384, False), ("bits", 16384, True), ("bits", 65536, False))
]


def check_configuration(config):
    keys = {"name", "vocabs", "encode", "index", "search"}
    if not isinstance(config, dict) or set(config) - keys or not {"name", "vocabs"} <= set(config):
        raise ValueError(f"a configuration is a dict with 'name' and 'vocabs' and optionally "
                         f"'encode', 'index', 'search': got {config!r}")
    config = {"encode": [], "index": [], "search": [], **config}
    if not config["vocabs"] or not all(isinstance(v, list) for v in config["vocabs"]):
        raise ValueError(f"{config['name']}: 'vocabs' is a list of option lists, one per vocabulary")
    for options in [*config["vocabs"], config["encode"], config["index"], config["search"]]:
        if not all(isinstance(option, str) for option in options):
            raise ValueError(f"{config['name']}: options are strings: {options!r}")
    return config


# ------------------------------------------------------------------ the set


def write_json(path, value):
    """Atomic: a file that exists is complete."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def attack(image, rng, blur):
    """Rotated crop -> scale -> optional blur -> JPEG. Returns (JPEG bytes, parameters)."""
    h, w = image.shape
    side = rng.uniform(0.5, 0.7)
    angle = rng.uniform(-25.0, 25.0)
    scale = rng.uniform(0.6, 1.4)
    quality = int(rng.integers(10, 26))
    sigma = float(rng.uniform(1.5, 2.5)) if blur else None
    cw, ch = side * w, side * h
    out_w, out_h = round(cw), round(ch)
    cos, sin = np.cos(np.radians(angle)), np.sin(np.radians(angle))
    # The rotated window's bounding box must lie inside the photo (pixel centres at
    # integers, the photo spans [-0.5, w - 0.5]).
    box_w, box_h = out_w * abs(cos) + out_h * abs(sin), out_w * abs(sin) + out_h * abs(cos)
    cx = rng.uniform(box_w / 2 - 0.5, w - 0.5 - box_w / 2)
    cy = rng.uniform(box_h / 2 - 0.5, h - 0.5 - box_h / 2)
    # Output pixel (u, v) samples the photo at centre + R(angle) (u - uc, v - vc).
    uc, vc = (out_w - 1) / 2, (out_h - 1) / 2
    inverse = np.array([[cos, -sin, cx - cos * uc + sin * vc],
                        [sin, cos, cy - sin * uc - cos * vc]])
    crop = cv2.warpAffine(image, inverse, (out_w, out_h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REFLECT_101)
    size = (max(16, round(out_w * scale)), max(16, round(out_h * scale)))
    crop = cv2.resize(crop, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    if sigma is not None:
        crop = cv2.GaussianBlur(crop, (0, 0), sigma)
    ok, data = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    parameters = {"side": round(side, 4), "angle": round(angle, 2), "scale": round(scale, 4),
                  "blur_sigma": None if sigma is None else round(sigma, 3), "jpeg_quality": quality,
                  "centre": [round(cx, 2), round(cy, 2)], "size": list(size)}
    return data.tobytes(), parameters


def scene15_set(data, n_database, n_queries, seed):
    """(database [(relative path, source file)], queries [(relative path, source relative
    path, JPEG bytes, parameters)])."""
    test = Path(data) / "test"
    classes = sorted(p.name for p in test.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise SystemExit(f"no class folders in {test}")
    files = {name: sorted(p for p in (test / name).iterdir() if p.suffix.lower() == ".jpg")
             for name in classes}
    rng = np.random.default_rng(seed)
    # The same number from each class; the remainder from classes drawn at random.
    per_class = {name: n_database // len(classes) for name in classes}
    for name in rng.choice(classes, n_database % len(classes), replace=False):
        per_class[str(name)] += 1
    database = {}
    for name in classes:
        if per_class[name] > len(files[name]):
            raise SystemExit(f"{test / name} has {len(files[name])} photos, {per_class[name]} wanted")
        chosen = sorted(rng.choice(len(files[name]), per_class[name], replace=False))
        database[name] = [files[name][i] for i in chosen]
    queries_per_class = {name: n_queries // len(classes) for name in classes}
    for name in rng.choice(classes, n_queries % len(classes), replace=False):
        queries_per_class[str(name)] += 1
    sources = []
    for name in classes:
        chosen = sorted(rng.choice(len(database[name]), queries_per_class[name], replace=False))
        sources += [database[name][i] for i in chosen]
    blurred = set(rng.choice(len(sources), len(sources) // 2, replace=False).tolist())
    queries = []
    for i, path in enumerate(sources):
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if image is None:
            raise SystemExit(f"cannot read {path}")
        jpeg, parameters = attack(image, rng, blur=i in blurred)
        relative = f"{path.parent.name}/{path.name}"
        queries.append((f"queries/{relative}", f"database/{relative}", jpeg, parameters))
    database = [(f"database/{name}/{path.name}", path) for name in classes for path in database[name]]
    return database, queries


def demo_set(seed):
    """vladkit demo's near-duplicate set, as files: PNG originals and distractors in the
    database, PNG queries (the "jpeg q=8" attack's artefacts are in its pixels), and the
    demo's learning images (grey PNG crops of the photos upside down)."""
    from vladkit.datasets.near_duplicates import demo_photos, near_duplicate_set

    data = near_duplicate_set(demo_photos(), learning_per_photo=32, seed=seed)  # as run_demo

    def slug(text):
        for old, new in (("σ", "sigma "), ("°", "deg"), ("%", "pct"), (".png", ""), (".jpg", "")):
            text = text.replace(old, new)
        return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")

    def png(image):
        ok, encoded = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        assert ok
        return encoded.tobytes()

    names = {}
    database = []
    for identifier, image in data.database:
        photo, _, rest = identifier.rstrip("]").partition(" [")
        names[identifier] = f"database/{slug(photo)}{'-' + slug(rest) if rest else ''}.png"
        database.append((names[identifier], png(image)))
    queries = []
    for identifier, image, attack_name in data.queries:
        photo = identifier.partition(" [")[0]
        path = f"queries/{slug(photo)}/{slug(attack_name)}.png"
        queries.append((path, names[data.ground_truth[identifier][0]], png(image), {"attack": attack_name}))
    learning = []
    for i, image in enumerate(data.learning):
        ok, encoded = cv2.imencode(".png", image)
        assert ok
        learning.append((f"learning/{i:04d}.png", encoded.tobytes()))
    return database, queries, learning


def build_set(root, args):
    """Write the set into ROOT once; return its fingerprint (a hash of what defines it)."""
    root.mkdir(parents=True, exist_ok=True)
    if args.set == "demo":
        wanted = {"set": "demo", "seed": args.seed, "version": SET_VERSION}
    else:
        wanted = {"set": "scene15", "seed": args.seed, "database": args.database, "queries": args.queries, "version": SET_VERSION}
    set_file, truth_file, attacks_file = root / "set.json", root / "ground_truth.json", root / "attacks.json"
    if set_file.is_file():
        found = json.loads(set_file.read_text(encoding="utf-8"))
        if found != wanted:
            raise SystemExit(f"{root} holds another set ({found}); use another --cache, or delete {root}")
    if not truth_file.is_file():  # written last: missing means never built, or interrupted
        print(f"writing the {wanted['set']} set into {root} ...", flush=True)
        for folder in ("database", "queries", "learning"):
            shutil.rmtree(root / folder, ignore_errors=True)
        write_json(set_file, wanted)
        learning = []
        if args.set == "demo":
            database, queries, learning = demo_set(args.seed)
        else:
            database, queries = scene15_set(args.data, args.database, args.queries, args.seed)
        for relative, source in database + learning:
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            if isinstance(source, bytes):
                (root / relative).write_bytes(source)
            else:
                shutil.copyfile(source, root / relative)
        for relative, _, encoded, _ in queries:
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            (root / relative).write_bytes(encoded)
        write_json(attacks_file, {relative: parameters for relative, _, _, parameters in queries})
        write_json(truth_file, {relative: positive for relative, positive, _, _ in queries})
    truth = json.loads(truth_file.read_text(encoding="utf-8"))
    n_database = sum(1 for p in (root / "database").rglob("*") if p.is_file())
    n_learning = sum(1 for p in (root / "learning").rglob("*") if p.is_file())
    print(f"set: {n_database} database images, {len(truth)} queries"
          f"{f', {n_learning} learning images' if n_learning else ''} ({root})", flush=True)
    digest = hashlib.sha256()
    for path in (set_file, truth_file, attacks_file):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16], truth


# ------------------------------------------------------------------ steps through the CLI


def key(*parts):
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12]


def shown(command):
    return " ".join(["vladkit", *command[3:]])


def run(command, root):
    """Run a vladkit command in ROOT; (stdout, wall seconds, CPU seconds). Exits on failure."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=root, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"failed (exit status {done.returncode}): {shown(command)}")
    return done.stdout, seconds, cpu


def step(root, name, command, log):
    """Run COMMAND once: its record steps/NAME.json says it finished."""
    record = root / STEPS / f"{name}.json"
    if record.is_file():
        return json.loads(record.read_text(encoding="utf-8"))
    log(f"  $ {shown(command)}")
    stdout, seconds, _ = run(command, root)
    result = {"command": shown(command), "seconds": round(seconds, 2), "stdout": stdout}
    write_json(record, result)
    log(f"    {seconds:.1f} s: {stdout.strip().splitlines()[-1] if stdout.strip() else ''}")
    return result


def cli(*arguments):
    return [sys.executable, "-m", "vladkit", *arguments]


def evaluate(config, root, fingerprint, truth, args, log):
    """Run (or reuse) every step of one configuration; the row of the table."""
    steps = root / STEPS
    steps.mkdir(exist_ok=True)
    # A set with a learning/ folder (the demo's) learns vocabularies, PCA and quantizers
    # on it; otherwise on the database.
    learning = "learning" if (root / "learning").is_dir() else None
    vocabularies = []
    for options in config["vocabs"]:
        name = f"vocab-{key(fingerprint, options)}"
        step(root, name, cli("vocab", "build", learning or "database", *options, "-o", f"{STEPS}/{name}.npz",
                             "-q"), log)
        vocabularies.append(f"{STEPS}/{name}.npz")
    vocab_options = [option for path in vocabularies for option in ("--vocab", path)]
    compressed = "--pca" in config["index"] or "--pq" in config["index"]
    # ASMK's word sets are a folder of shards, and its queries are encoded by search only.
    word_sets = "asmk" in config["encode"]
    encodings = {}
    for folder in ("database",) + (() if word_sets else ("queries",)) + (("learning",) if learning and compressed
                                                                          else ()):
        name = f"encode-{key(fingerprint, vocabularies, config['encode'])}-{folder}"
        output = f"{STEPS}/{name}" + (".asmk" if word_sets else ".npz")
        step(root, name, cli("encode", folder, *vocab_options, *config["encode"], "-o", output, "-q"), log)
        encodings[folder] = output
    index_options = list(config["index"])
    if "learning" in encodings:
        index_options += ["--train", encodings["learning"]]
    # The re-ranking features are the library's defaults: a change of them is a new index.
    rerank_features = (describe_extractor(default_rerank_extractor()) if "--rerank-features" in index_options
                       else None)
    index_name = f"index-{key(fingerprint, encodings['database'], index_options, *filter(None, [rerank_features]))}"
    built = step(root, index_name, cli("index", "build", encodings["database"], *index_options, "-o",
                                       f"{STEPS}/{index_name}"), log)
    match = re.search(r"([\d,]+) bytes per image", built["stdout"])
    bytes_per_image = int(match.group(1).replace(",", "")) if match else None

    queries = sorted(truth)
    search_name = f"search-{key(fingerprint, index_name, config['search'], args.top, queries)}"
    record = steps / f"{search_name}.json"
    if record.is_file():
        result = json.loads(record.read_text(encoding="utf-8"))
    else:
        command = cli("search", f"{STEPS}/{index_name}", *queries, "--top", str(args.top), "--json",
                      *config["search"])
        one = cli("search", f"{STEPS}/{index_name}", queries[0], "--top", str(args.top), "--json",
                  *config["search"])
        log(f"  $ {shown(command[:5] + ['QUERIES...'] + command[5 + len(queries):])}  "
            f"(x{args.repeat}, and with one query)")
        timings = {"seconds_all": [], "seconds_one": [], "cpu_all": [], "cpu_one": []}
        for _ in range(args.repeat):
            stdout, seconds, cpu = run(command, root)
            timings["seconds_all"].append(round(seconds, 3))
            timings["cpu_all"].append(round(cpu, 3))
            answers = json.loads(stdout)
            _, seconds, cpu = run(one, root)
            timings["seconds_one"].append(round(seconds, 3))
            timings["cpu_one"].append(round(cpu, 3))
        result = {"command": shown(command), "answers": answers, **timings,
                  "load_average": round(os.getloadavg()[0], 2)}
        write_json(record, result)
    answers = {answer["query"]: [hit["id"] for hit in answer["results"]] for answer in result["answers"]}
    missing = [query for query in queries if query not in answers]
    if missing:
        raise SystemExit(f"{config['name']}: search answered {len(answers)} of {len(queries)} queries "
                         f"(missing e.g. {missing[0]})")
    ranks = []
    for query in queries:
        ids = answers[query]
        ranks.append(ids.index(truth[query]) + 1 if truth[query] in ids else None)
    reciprocal = np.array([0.0 if r is None else 1.0 / r for r in ranks])

    def marginal_ms(total, one):
        if total not in result:  # a record from before CPU times were kept
            return float("nan")
        return 1000 * (statistics.median(result[total]) - statistics.median(result[one])) / max(1, len(queries) - 1)

    row = {
        "name": config["name"],
        "bytes": bytes_per_image,
        "recall@1": float(np.mean([r == 1 for r in ranks])),
        "recall@10": float(np.mean([r is not None and r <= 10 for r in ranks])),
        "mAP": float(reciprocal.mean()),
        "ms/query": marginal_ms("seconds_all", "seconds_one"),
        "cpu ms/query": marginal_ms("cpu_all", "cpu_one"),
        "command s": statistics.median(result["seconds_one"]),
        "load": result.get("load_average", float("nan")),
        "check": None,
        "index": f"{STEPS}/{index_name}",
        "answers": answers,
    }
    if not config["index"] and not config["search"] and not word_sets:
        row["check"] = same_first_result(root, encodings, queries, answers)
    return row


def same_first_result(root, encodings, queries, answers):
    """Exact index: does ranking `encode`'s query vectors ourselves give search's first result?"""
    with np.load(root / encodings["database"], allow_pickle=False) as z:
        database, database_ids = z["vectors"], [str(i) for i in z["ids"]]
    with np.load(root / encodings["queries"], allow_pickle=False) as z:
        vectors, query_ids = z["vectors"], [str(i) for i in z["ids"]]
    scores = vectors @ database.T
    position = {query: i for i, query in enumerate(query_ids)}
    agree = sum(database_ids[int(np.argmax(scores[position[query]]))] == answers[query][0]
                for query in queries if query in position)
    return agree, len(queries)


# ------------------------------------------------------------------ main


def table(rows):
    lines = ["| configuration | bytes/image | recall@1 | recall@10 | mAP | ms/query |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        size = f"{row['bytes']:,}" if row["bytes"] is not None else "?"
        lines.append(f"| {row['name']} | {size} | {row['recall@1']:.3f} | {row['recall@10']:.3f} | "
                     f"{row['mAP']:.3f} | {row['ms/query']:.1f} |")
    return "\n".join(lines)


def timing_table(rows):
    lines = ["| configuration | ms/query (wall, marginal) | CPU ms/query (marginal) | search with one query, s "
             "| load average after the searches |",
             "|---|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['name']} | {row['ms/query']:.1f} | {row['cpu ms/query']:.1f} | "
                     f"{row['command s']:.2f} | {row['load']:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "scene15"),
                        help="15-Scene folder with test/ (default: ../shared/data/scene15)")
    parser.add_argument("--cache", default="bench-retrieval-cache",
                        help="folder for the set and every intermediate file (default bench-retrieval-cache/)")
    parser.add_argument("--set", choices=("scene15", "demo"), default="scene15",
                        help="15-Scene near duplicates (default), or vladkit demo's set (in CACHE/demo/)")
    parser.add_argument("--seed", type=int, default=0, help="the set's random seed (default 0)")
    parser.add_argument("--database", type=int, default=1200, help="database photos (default 1,200)")
    parser.add_argument("--queries", type=int, default=80, help="attacked queries (default 80)")
    parser.add_argument("--only", nargs="+", metavar="PATTERN",
                        help="run the configurations whose name matches one of these (shell patterns, "
                             "e.g. 'dense-*' '*-exact')")
    parser.add_argument("--add", metavar="FILE", help="JSON list of more configurations (see above)")
    parser.add_argument("--list", action="store_true", help="list the configurations and exit")
    parser.add_argument("--top", type=int, default=100,
                        help="results per query (default 100): a positive ranked lower scores AP 0")
    parser.add_argument("--repeat", type=int, default=5,
                        help="timed runs of each search, the median is reported (default 5)")
    parser.add_argument("--out", help="markdown file for the table (default CACHE/results.md)")
    parser.add_argument("--montage", metavar="PNG",
                        help="also draw a few queries' top 5 before and after re-ranking, from the first "
                             "configuration run that re-ranks (e.g. benchmarks/results/retrieval_montage.png)")
    args = parser.parse_args(argv)
    if args.top < 10:
        parser.error("--top must be at least 10 (recall@10)")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    configurations = list(CONFIGURATIONS)
    if args.add:
        configurations += json.loads(Path(args.add).read_text(encoding="utf-8"))
    try:
        configurations = [check_configuration(config) for config in configurations]
    except ValueError as exc:
        parser.error(str(exc))
    names = [config["name"] for config in configurations]
    if len(set(names)) != len(names):
        parser.error("configuration names must be unique")
    if args.only:
        configurations = [c for c in configurations if any(fnmatch.fnmatchcase(c["name"], p) for p in args.only)]
        if not configurations:
            parser.error(f"no configuration matches {args.only}; --list shows them")
    if args.list:
        for config in configurations:
            print(json.dumps(config))
        return 0

    started = time.perf_counter()
    root = Path(args.cache) / "demo" if args.set == "demo" else Path(args.cache)
    root = root.resolve()
    fingerprint, truth = build_set(root, args)
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}", flush=True)

    def log(line):
        print(line, flush=True)

    rows = []
    for config in configurations:
        log(f"{config['name']}:")
        row = evaluate(config, root, fingerprint, truth, args, log)
        rows.append(row)
        log(f"    recall@1 {row['recall@1']:.3f}  recall@10 {row['recall@10']:.3f}  mAP {row['mAP']:.3f}  "
            f"{row['ms/query']:.1f} ms/query")

    text = table(rows)
    checks = [f"{row['name']} {row['check'][0]}/{row['check'][1]}" for row in rows if row["check"]]
    notes = (f"\n\n{len(truth)} queries, {args.set} set (seed {args.seed}); mAP: AP = 1/rank of the positive "
             f"in the top {args.top}. ms/query: marginal (the search of all queries minus that of the first "
             f"alone, over {len(truth) - 1}; the median of {args.repeat} runs each).\n\n" + timing_table(rows))
    if checks:
        notes += "\n\nSame first result as ranking `encode`'s query vectors (exact indexes): " + ", ".join(checks) + "."
    print()
    print(text + notes)
    out = Path(args.out) if args.out else root / "results.md"
    out.write_text(text + notes + "\n", encoding="utf-8")
    if args.montage:
        reranked = [(c, row) for c, row in zip(configurations, rows) if "--rerank" in c["search"]]
        if not reranked:
            raise SystemExit("--montage needs a configuration that re-ranks (e.g. --only '*rerank*')")
        config, row = reranked[0]
        # The same index searched without re-ranking: the "before" column.
        stdout, _, _ = run(cli("search", row["index"], *sorted(truth), "--top", "5", "--json"), root)
        before = {answer["query"]: [hit["id"] for hit in answer["results"]] for answer in json.loads(stdout)}
        draw_montage(root, truth, before, row["answers"], Path(args.montage), config["name"])
        print(f"(wrote {args.montage})")
    print(f"\n(wrote {out}; {time.perf_counter() - started:.0f} s)")
    return 0


# ------------------------------------------------------------------ montage

def montage_queries(truth, before, after, n=6):
    """Up to ``n`` queries in a fixed order: copies re-ranking moved to the first place,
    then one already first, then one re-ranking did not find."""
    fixed = [q for q in sorted(truth) if before[q][:1] != [truth[q]] and after[q][:1] == [truth[q]]]
    kept = [q for q in sorted(truth) if before[q][:1] == [truth[q]]]
    missed = [q for q in sorted(truth) if after[q][:1] != [truth[q]]]
    return (fixed[:max(1, n - 2)] + kept[:1] + missed[:1])[:n]


def draw_montage(root, truth, before, after, path, name, top=5, side=96, gap=12):
    """One row per query: the query, its top ``top`` before and after re-ranking; the copy's
    original framed in green."""
    def tile(relative, good):
        image = cv2.imread(str(root / relative), cv2.IMREAD_COLOR)
        if image is None:
            image = np.zeros((side, side, 3), np.uint8)
        h, w = image.shape[:2]
        scale = side / max(h, w)
        image = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        cell = np.full((side + 6, side + 6, 3), 255, np.uint8)
        cell[3:3 + image.shape[0], 3:3 + image.shape[1]] = image
        cv2.rectangle(cell, (0, 0), (side + 5, side + 5), (40, 170, 40) if good else (200, 200, 200), 3)
        return cell

    queries = montage_queries(truth, before, after)
    blank = np.full((side + 6, gap, 3), 255, np.uint8)
    lines = []
    for query in queries:
        cells = [tile(query, False), blank, blank]
        cells += [tile(hit, hit == truth[query]) for hit in before[query][:top]]
        cells += [blank, blank]
        cells += [tile(hit, hit == truth[query]) for hit in after[query][:top]]
        lines.append(np.hstack(cells))
        lines.append(np.full((gap, lines[-1].shape[1], 3), 255, np.uint8))
    body = np.vstack(lines)
    header = np.full((40, body.shape[1], 3), 255, np.uint8)
    cell = side + 6
    for x, text in ((0, "query"), (cell + 2 * gap, f"top {top}, global search"),
                    (cell + 2 * gap + top * cell + 2 * gap, f"top {top}, re-ranked ({name})")):
        cv2.putText(header, text, (x + 4, 26), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.vstack([header, body])):
        raise SystemExit(f"could not write {path}")


if __name__ == "__main__":
    sys.exit(main())
