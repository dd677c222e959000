"""Peak memory and speed of the streaming paths on phone photos, under memory budgets.

    cd benchmarks && python bench_photos.py [--photos /tmp/vladkit-phone-photos]
        [--pano DIR] [--n 100] [--quick] [--out results/photos.md]

Every row is one fresh process run under ``/usr/bin/time -v``; the table gives its peak
resident memory ("Maximum resident set size"), its wall-clock time ("Elapsed (wall
clock)"; interpreter start and imports included) and images per second (images given to
the command / wall seconds). The commands are what a user types, with the defaults a user
gets (the CLI is run as ``python -m vladkit``, the same ``main`` as the ``vladkit``
console script):

* ``python -c "import vladkit"``: the floor, what every row pays before any image.
* On ``--n`` synthetic 12-megapixel phone photos (phone_photos.py: 4032 x 3024 JPEG,
  quality 92, seeds 0 to n-1), with the default budget (1 GB) and with ``--max-memory
  300MB`` (``ImageEncoder(max_memory="300MB")``):

  1. ``vladkit vocab build PHOTOS -k 64 --root -o dense.npz`` (dense SIFT, k-means)
  2. ``vladkit vocab build PHOTOS -k 64 --root --features sift -o sift.npz``
  3. ``vladkit encode PHOTOS --vocab dense.npz -o enc.npz`` (dense SIFT, VLAD)
  4. ``vladkit encode PHOTOS --vocab sift.npz -o enc.npz`` (sparse SIFT, VLAD)
  5. ``ImageEncoder(DenseSIFT(root=True, n_jobs=-1), FisherEncoder(64, random_state=0),
     random_state=0).fit(paths).transform(paths)`` in ``python -c`` (both passes: every
     image is read and extracted twice; the notes give fit and transform seconds).

  The encode rows use the vocabularies built with the default budget, so the two budgets'
  outputs can be compared (section "Same results under both budgets").
* One synthetic 50-megapixel panorama (10000 x 5000 JPEG, seed 1000) through rows 1, 3
  and 5: with the defaults (long side downscaled to 640), then at full resolution
  (``--max-side 0``, ``DenseSIFT(max_side=None)``: ~12 million dense descriptors, 6 GB
  of float32, which neither budget holds: the image is extracted and encoded in pieces) with
  the default 1 GB budget and with 300 MB. The full-resolution rows take minutes each.

The whole run takes about 50 minutes on 2 cores (most of it fitting the Fisher GMMs and
the full-resolution panorama under 300 MB); ``--quick`` (5-15 minutes): 6 photos, and the
panorama with the defaults only.

The photos are generated once into --photos (and the panorama into --pano, default the
same folder) and reused: an existing file is not rewritten (phone_photos.py names files
by seed, size and quality). Each run sees exactly its photos (a folder of links to them),
and writes its vocabularies and encodings to a temporary folder deleted at the end. The
table is printed and written to --out after every row, with the machine (cores, memory,
load average: rows on a busy machine are slower, not bigger), the exact commands, and for
every row the last lines of its stderr (progress bars, warnings) in the printed log.
"""

from __future__ import annotations

import vladkit  # noqa: F401  (first: thread-wait settings before numpy loads)

import argparse
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from phone_photos import write_phone_photos

from vladkit import list_images

K = 64
SMALL_BUDGET = "300MB"
PANO_SEED, PANO_WIDTH, PANO_HEIGHT = 1000, 10000, 5000
TIME = "/usr/bin/time"
ROW_TIMEOUT = 3 * 3600  # seconds: a hung row is reported, not waited for forever
CLI = [sys.executable, "-m", "vladkit"]

IMAGE_ENCODER_CODE = """\
import vladkit, json, time
import numpy as np
from vladkit import DenseSIFT, FisherEncoder, ImageEncoder, list_images
paths = list_images({folder!r})
model = ImageEncoder(DenseSIFT({extractor_args}), FisherEncoder(64, random_state=0), random_state=0{budget_arg})
start = time.perf_counter(); model.fit(paths); fit = time.perf_counter() - start
start = time.perf_counter(); X = model.transform(paths); transform = time.perf_counter() - start
np.save({output!r}, X)
print(json.dumps({{"fit": fit, "transform": transform, "shape": list(X.shape)}}))
"""


# --------------------------------------------------------------------------- machine


def machine_line():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ram = cpu = "?"
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    ram = f"{int(line.split()[1]) / 1024**2:.1f} GiB RAM"
        with open("/proc/cpuinfo") as handle:
            models = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
            cpu = models[0] if models else platform.processor() or "?"
    except OSError:
        pass
    return (f"{cores} cores (nproc), {ram}, {cpu}; Python {platform.python_version()}, "
            f"vladkit {vladkit.__version__}, numpy {np.__version__}, OpenCV {cv2.__version__}")


def load_average():
    try:
        return "load average {:.2f} / {:.2f} / {:.2f}".format(*os.getloadavg())
    except OSError:
        return "load average ?"


def code_version():
    """``(label, fingerprint)`` of the vladkit being measured: git HEAD (+ "dirty" when the
    package has uncommitted changes) and a hash of its source files, to notice the code
    changing under a long run (an editable install measures whatever is on disk)."""
    package = Path(vladkit.__file__).resolve().parent
    digest = hashlib.sha1()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    label = "not a git checkout"
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=package, capture_output=True,
                              text=True, timeout=30)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=package, capture_output=True,
                               text=True, timeout=30)
        if head.returncode == 0:
            label = head.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return label, digest.hexdigest()[:8]


# --------------------------------------------------------------------------- running


def parse_time_v(text):
    """(peak RSS in MB, wall seconds) from GNU time's ``-v`` report."""
    rss = re.search(r"Maximum resident set size \(kbytes\):\s*(\d+)", text)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\):\s*([\d:.]+)", text)
    peak = int(rss.group(1)) * 1024 / 1e6 if rss else float("nan")
    seconds = float("nan")
    if wall:
        seconds = 0.0
        for part in wall.group(1).split(":"):
            seconds = seconds * 60 + float(part)
    return peak, seconds


def condensed(stderr):
    """stderr shortened: each line's last carriage-return update, and of consecutive
    lines of one progress bar (same text before the first colon; tqdm writes a new line
    per refresh when stderr is not a terminal) the last, with how many there were."""
    lines = []
    for line in stderr.replace("\r\n", "\n").split("\n"):
        shown = [piece for piece in line.split("\r") if piece.strip()]
        if shown:
            lines.append(shown[-1].rstrip())
    runs = []  # [key, last line, count]
    for line in lines:
        key = line.split(":", 1)[0] if ":" in line else None
        if runs and key is not None and runs[-1][0] == key:
            runs[-1][1:] = [line, runs[-1][2] + 1]
        else:
            runs.append([key, line, 1])
    return [line if count == 1 else f"{line}   [{count} lines like this]" for _, line, count in runs]


def run(argv, workdir, label):
    """Run argv under /usr/bin/time -v; returns a dict of the measurements."""
    report = Path(workdir) / f"time-{label}.txt"
    start = time.perf_counter()
    # Its own process group: an interrupted benchmark stops the command, not only `time`.
    process = subprocess.Popen([TIME, "-v", "-o", str(report), *argv], stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=ROW_TIMEOUT)
        returncode = process.returncode
    except subprocess.TimeoutExpired:
        _stop(process)
        stdout, stderr = process.communicate()
        returncode = "timeout"
    except BaseException:
        _stop(process)
        raise
    outside = time.perf_counter() - start
    text = report.read_text(errors="replace") if report.exists() else ""
    peak, wall = parse_time_v(text)
    if wall != wall:  # GNU time gave nothing (timeout): our own clock
        wall = outside
    return {"rc": returncode, "peak_mb": peak, "wall_s": wall, "stdout": stdout, "stderr": stderr}


def _stop(process):
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def show_command(argv):
    """argv as a shell line, ``python -m vladkit`` shown as ``vladkit``."""
    if argv[:3] == CLI:
        return "vladkit " + shlex.join(argv[3:])
    if argv[:2] == [sys.executable, "-c"]:
        return "python -c " + shlex.quote(argv[2])
    return shlex.join(argv)


# --------------------------------------------------------------------------- rows


def link_folder(paths, folder):
    """A folder holding exactly ``paths`` (as symbolic links): the commands take folders."""
    folder = Path(folder)
    folder.mkdir(parents=True)
    for path in paths:
        (folder / path.name).symlink_to(Path(path).resolve())
    found = list_images(folder)
    if len(found) != len(paths):
        raise RuntimeError(f"{folder}: list_images finds {len(found)} images, expected {len(paths)}")
    return folder


def cli_rows(folder, n_images, out, tag, budget, max_side, kinds, vocabs):
    """Rows 1-4 (those in ``kinds``) on ``folder``; ``vocabs`` maps kind -> vocabulary file
    for the encode rows (the default-budget build of the same group)."""
    extra = []
    if max_side is not None:
        extra += ["--max-side", str(max_side)]
    if budget is not None:
        extra += ["--max-memory", budget]
    rows = []
    for kind in kinds:
        features = [] if kind == "dense" else ["--features", "sift"]
        vocab = out / f"vocab-{tag}-{kind}.npz"
        rows.append(dict(key=("vocab", tag, kind), what=f"vocab build ({kind})", n=n_images,
                         argv=[*CLI, "vocab", "build", str(folder), "-k", str(K), "--root", *features,
                               *extra, "-o", str(vocab)],
                         output=vocab))
        vocabs.setdefault((tag.split("@")[0], kind), vocab)
    for kind in kinds:
        encoded = out / f"encode-{tag}-{kind}.npz"
        rows.append(dict(key=("encode", tag, kind), what=f"encode ({kind})", n=n_images,
                         argv=[*CLI, "encode", str(folder), "--vocab", str(vocabs[(tag.split("@")[0], kind)]),
                               *extra, "-o", str(encoded)],
                         output=encoded))
    return rows


def image_encoder_row(folder, n_images, out, tag, budget, max_side):
    extractor_args = "root=True, n_jobs=-1"
    if max_side is not None:
        extractor_args += f", max_side={max_side or None}"
    output = out / f"image-encoder-{tag}.npy"
    code = IMAGE_ENCODER_CODE.format(folder=str(folder), extractor_args=extractor_args,
                                     budget_arg="" if budget is None else f", max_memory={budget!r}",
                                     output=str(output))
    return dict(key=("image-encoder", tag, "dense"), what="ImageEncoder FV fit+transform", n=n_images,
                argv=[sys.executable, "-c", code], output=output)


def plan(photos_dir, n_photos, pano_dir, out, quick):
    rows = [dict(key=("baseline",), what="python -c 'import vladkit'", n=0, budget="-", max_side="-",
                 argv=[sys.executable, "-c", "import vladkit"], output=None)]
    vocabs = {}
    groups = [("photos", photos_dir, n_photos, ("dense", "sift"), None)]
    groups.append(("pano", pano_dir, 1, ("dense",), None))
    if not quick:
        groups.append(("pano-full", pano_dir, 1, ("dense",), 0))
    for group, folder, n_images, kinds, max_side in groups:
        for budget in (None, SMALL_BUDGET):
            if group == "pano" and budget is not None:
                continue  # the panorama downscaled to 640 is small: one budget says it all
            tag = group + ("" if budget is None else "@" + budget)
            side = {None: None, 0: "0 (full)"}[max_side]
            new = cli_rows(folder, n_images, out, tag, budget, max_side, kinds, vocabs)
            new.append(image_encoder_row(folder, n_images, out, tag, budget, max_side))
            for row in new:
                row["group"] = group
                row["budget"] = budget or "1GB (default)"
                kind = row["key"][2]
                row["max_side"] = side or ("640 (default)" if kind == "dense" else "1024 (default)")
            rows += new
    return rows


# --------------------------------------------------------------------------- checks


def max_difference(first, second):
    """Largest absolute difference over the numeric arrays two .npz/.npy files share."""
    def arrays(path):
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return {"array": loaded}
        with loaded:
            return {name: loaded[name] for name in loaded.files}

    a, b = arrays(first), arrays(second)
    worst, compared = 0.0, []
    for name in sorted(set(a) & set(b)):
        if a[name].dtype.kind not in "fiu" or b[name].dtype.kind not in "fiu":
            continue
        if a[name].shape != b[name].shape:
            return f"`{name}` shapes differ: {a[name].shape} vs {b[name].shape}"
        if a[name].size:
            worst = max(worst, float(np.max(np.abs(a[name].astype(np.float64) - b[name]))))
        compared.append(name)
    return f"max |difference| {worst:.3g} over {', '.join(compared) or 'nothing'}"


def consistency(rows, results):
    """Each row under 300MB against the same row under the default budget."""
    by_key = {row["key"]: (row, result) for row, result in zip(rows, results)}
    lines = []
    for key, (row, result) in by_key.items():
        if len(key) < 3 or "@" not in key[1]:
            continue
        base_key = (key[0], key[1].split("@")[0], key[2])
        if base_key not in by_key:
            continue
        base_row, base_result = by_key[base_key]
        if result["rc"] != 0 or base_result["rc"] != 0:
            verdict = "not compared (a run failed)"
        else:
            try:
                verdict = max_difference(base_row["output"], row["output"])
            except (OSError, ValueError) as exc:
                verdict = f"not compared ({exc})"
        lines.append(f"- {row['group']}, {row['what']}: {row['budget']} vs {base_row['budget']}: {verdict}")
    return lines


# --------------------------------------------------------------------------- report


HEADER = ("| # | command | images | budget | max_side | peak RSS MB | wall s | images/s | notes |\n"
          "|---|---|---:|---|---|---:|---:|---:|---|")


def table_line(number, row, result):
    rc = result["rc"]
    notes = []
    if rc != 0:
        notes.append(f"**FAILED (exit {rc})**")
    if result["peak_mb"] > 2000:
        notes.append("**peak above 2,000 MB**")
    if row["key"][0] == "image-encoder" and rc == 0:
        try:
            timing = json.loads(result["stdout"].strip().splitlines()[-1])
            notes.append(f"fit {timing['fit']:.1f} s + transform {timing['transform']:.1f} s")
        except (ValueError, IndexError, KeyError):
            pass
    group = {"photos": "photos", "pano": "panorama", "pano-full": "panorama"}.get(row.get("group"), "")
    what = f"{row['what']}, {group}" if group else row["what"]
    notes.append(f"load {result['load']:.1f}")
    if result.get("code_changed"):
        notes.append(f"vladkit source {result['code'][1]}")
    rate = f"{row['n'] / result['wall_s']:.3g}" if row["n"] and rc == 0 else "-"
    return (f"| {number} | {what} | {row['n'] or '-'} | {row['budget']} | {row['max_side']} | "
            f"{result['peak_mb']:,.0f} | {result['wall_s']:.1f} | {rate} | {'; '.join(notes)} |")


def markdown(machine, setup, rows, results, out_dir, finished, total_s):
    versions = {}  # source hash -> the git state it was first seen at
    for result in results:
        versions.setdefault(result["code"][1], result["code"][0])
    for result in results:
        result["code_changed"] = len(versions) > 1
    code = ", then ".join(f"{label} (source {fingerprint})" for fingerprint, label in versions.items())
    lines = ["# Streaming paths on phone photos: peak memory and speed under budgets", "",
             "Made by `benchmarks/bench_photos.py` (see its docstring). " + setup, "",
             f"Machine: {machine}. Notes give the 1-minute load average at the end of each row: "
             "above the core count, other processes shared the CPU and times are longer "
             "(peak memory is not affected).", "", f"vladkit: {code}."]
    if len(versions) > 1:
        lines += ["", "**The vladkit source changed during the run**: each row's notes name the "
                      "source it ran (a hash of vladkit/*.py); rows of different sources may not be "
                      "comparable."]
    lines += ["", HEADER]
    lines += [table_line(i, row, result) for i, (row, result) in enumerate(zip(rows, results))]
    if not finished:
        lines += ["", f"*(in progress: {len(results)} of {len(rows)} rows)*"]
    else:
        lines += ["", f"Total wall time of the benchmark: {total_s / 60:.1f} min."]
    checks = consistency(rows, results)
    if checks:
        lines += ["", "## Same results under both budgets", ""] + checks
    lines += ["", "## Commands", "",
              "`$OUT` is the temporary output folder; the CLI ran as `python -m vladkit` "
              "(shown as `vladkit`); each under `/usr/bin/time -v`.", ""]
    for i, row in enumerate(rows):
        if i >= len(results):
            break
        shown = show_command(row["argv"]).replace(str(out_dir), "$OUT")
        if "\n" in shown:
            lines += [f"{i}.", "", "```", shown, "```", ""]
        else:
            lines += [f"{i}. `{shown}`"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", default=os.path.join(tempfile.gettempdir(), "vladkit-phone-photos"),
                        metavar="DIR", help="cache folder of the 12 MP photos (generated if missing)")
    parser.add_argument("--pano", default=None, metavar="DIR",
                        help="cache folder of the 50 MP panorama (default: --photos)")
    parser.add_argument("--n", type=int, default=100, help="number of photos (default 100)")
    parser.add_argument("--quick", action="store_true",
                        help="6 photos, no full-resolution panorama rows (a few minutes)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "photos.md"),
                        help="markdown file to write (default results/photos.md)")
    args = parser.parse_args(argv)
    # Interrupted (Ctrl-C, or kill -INT / -TERM of a background run, which a non-interactive
    # shell starts with SIGINT ignored): stop the running row and delete the outputs.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench_photos: terminated"))
    if not os.path.exists(TIME):
        parser.error(f"{TIME} not found (GNU time: apt-get install time)")
    n_photos = min(args.n, 6) if args.quick else args.n
    started = time.perf_counter()
    machine = machine_line()
    print(f"machine: {machine}; {load_average()}", flush=True)

    t = time.perf_counter()
    photos = write_phone_photos(args.photos, n_photos, seed=0)
    pano = write_phone_photos(args.pano or args.photos, 1, seed=PANO_SEED, width=PANO_WIDTH, height=PANO_HEIGHT)
    print(f"photos: {n_photos} x 4032 x 3024 in {args.photos}, panorama {pano[0]} "
          f"({os.path.getsize(pano[0]) / 1e6:.1f} MB) ready in {time.perf_counter() - t:.0f} s", flush=True)
    setup = (f"{n_photos} phone photos (4032 x 3024 JPEG, quality 92, "
             f"{sum(os.path.getsize(p) for p in photos) / len(photos) / 1e6:.1f} MB each) and one "
             f"{PANO_WIDTH} x {PANO_HEIGHT} panorama ({os.path.getsize(pano[0]) / 1e6:.1f} MB), "
             "from benchmarks/phone_photos.py; K = 64 everywhere.")

    out_dir = Path(tempfile.mkdtemp(prefix="bench_photos-"))
    out_md = Path(args.out)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        rows = plan(link_folder(photos, out_dir / "photos"), n_photos, link_folder(pano, out_dir / "pano"),
                    out_dir, args.quick)
        for number, row in enumerate(rows):
            print(f"\n[{number}/{len(rows) - 1}] {show_command(row['argv']).replace(str(out_dir), '$OUT')}",
                  flush=True)
            version = code_version()
            result = run(row["argv"], out_dir, str(number))
            result["code"] = version
            result["load"] = os.getloadavg()[0]
            results.append(result)
            print(f"    exit {result['rc']}, peak {result['peak_mb']:,.0f} MB, {result['wall_s']:.1f} s, "
                  f"{load_average()}; vladkit {version[0]} (source {version[1]})", flush=True)
            tail = condensed(result["stderr"])[-12:]
            if tail:
                print(f"    stderr ({result['stderr'].count(chr(10))} lines; condensed, last lines):")
                print("\n".join("      | " + line for line in tail), flush=True)
            if row["key"][0] == "image-encoder" and result["stdout"].strip():
                print("    stdout: " + result["stdout"].strip().splitlines()[-1], flush=True)
            out_md.write_text(markdown(machine, setup, rows, results, out_dir, False, 0))
        total = time.perf_counter() - started
        text = markdown(machine, setup, rows, results, out_dir, True, total)
        out_md.write_text(text)
        print("\n" + text, flush=True)
        print(f"written to {out_md}; {load_average()}")
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
