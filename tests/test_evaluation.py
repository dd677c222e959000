from pathlib import Path, PurePath

import numpy as np
import pytest

from vladkit.retrieval.ground_truth import (GroundTruth, folder_ground_truth, folder_roots, holidays_ground_truth,
    retrieval_ground_truth)
from vladkit.retrieval.metrics import average_precision, mean_average_precision, recall_at_k

trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz


# ------------------------------------------------------------------ references


def reference_ap(ranked, positives, ignore=()):
    """AP as the area under the precision-recall curve: precision and recall after every
    rank from cumulative sums, the point (recall 0, precision 1) prepended, integrated
    over recall by the trapezoid rule. Ignored ids leave the ranking and the positives."""
    ranked = np.asarray(list(ranked))
    ignore = np.asarray(list(ignore))
    positives = np.asarray(list(positives))
    kept = ranked[~np.isin(ranked, ignore)] if len(ranked) else ranked
    relevant = positives[~np.isin(positives, ignore)]
    hits = np.isin(kept, relevant).astype(np.float64) if len(kept) else np.zeros(0)
    true_positives = np.cumsum(hits)
    precision = np.concatenate([[1.0], true_positives / np.arange(1, len(kept) + 1)])
    recall = np.concatenate([[0.0], true_positives / len(relevant)])
    return float(trapezoid(precision, recall))


def reference_recall(rankings, positives, ignore, k, exclude_query):
    """recall@k with a plain loop: does the filtered top k hold a positive?"""
    found = 0
    for query, relevant in positives.items():
        skip = set(ignore.get(query, ()))
        if exclude_query:
            skip.add(query)
        top = []
        for item in rankings[query]:
            if item not in skip:
                top.append(item)
        top = top[:k]
        if any(item in relevant and item not in skip for item in top):
            found += 1
    return found / len(positives)


def random_case(rng, universe=60, as_strings=False):
    """A random ranking (a random subset of ids in random order, so some positives are
    not retrieved), random positives and a random ignore set (which may overlap both)."""
    ids = np.arange(universe)
    ranked = rng.permutation(ids)[: rng.integers(0, universe + 1)]
    positives = rng.choice(ids, rng.integers(1, 12), replace=False)
    ignore = rng.choice(ids, rng.integers(0, 6), replace=False)
    if as_strings:
        return ([f"img{i}" for i in ranked], [f"img{i}" for i in positives],
                [f"img{i}" for i in ignore])
    return [int(i) for i in ranked], [int(i) for i in positives], [int(i) for i in ignore]


# ------------------------------------------------------------ AP against the reference


def test_reference_itself_on_hand_cases():
    # The reference is checked too, so agreement cannot come from sharing a mistake.
    assert reference_ap([1, 2, 3], [1, 2, 3]) == 1.0
    assert reference_ap([0, 1], [1]) == 0.25
    assert reference_ap([0, 1, 2], [0, 2]) == pytest.approx(19 / 24, abs=1e-15)
    assert reference_ap([5, 6], [1]) == 0.0


def test_average_precision_matches_the_area_under_the_pr_curve():
    rng = np.random.default_rng(0)
    checked = 0
    for case in range(1500):
        ranked, positives, ignore = random_case(rng, as_strings=case % 3 == 0)
        if not set(positives) - set(ignore):
            with pytest.raises(ValueError, match="no positives"):
                average_precision(ranked, positives, ignore)
            continue
        expected = reference_ap(ranked, positives, ignore)
        assert abs(average_precision(ranked, positives, ignore) - expected) <= 1e-12, case
        checked += 1
    assert checked >= 1000


def test_mean_average_precision_and_recall_match_references():
    rng = np.random.default_rng(1)
    for case in range(60):
        n_queries = int(rng.integers(1, 15))
        rankings, positives, ignore = {}, {}, {}
        for query in range(100, 100 + n_queries):
            ranked, pos, ign = random_case(rng)
            # The query is a database image: rankings often start with it, and it can be
            # listed among its own positives.
            if rng.random() < 0.5:
                ranked = [query, *ranked]
            if rng.random() < 0.3:
                pos = [*pos, query]
            if not set(pos) - set(ign) - {query}:
                pos = [*pos, 1000 + query]  # never retrieved: AP stays defined
            rankings[query], positives[query] = ranked, pos
            if rng.random() < 0.7:
                ignore[query] = ign
        truth = GroundTruth(positives, ignore)
        for exclude in (True, False):
            expected = np.mean([
                reference_ap(rankings[q], positives[q],
                             [*ignore.get(q, ()), *([q] if exclude else [])])
                for q in positives
            ])
            got = mean_average_precision(rankings, truth, exclude_query=exclude)
            assert abs(got - expected) <= 1e-12, (case, exclude)
            ks = (1, 2, 3, 5, 10, 100)
            recalls = recall_at_k(rankings, truth, k=ks, exclude_query=exclude)
            assert list(recalls) == list(ks)
            for k in ks:
                expected_recall = reference_recall(rankings, positives, ignore, k, exclude)
                assert abs(recalls[k] - expected_recall) <= 1e-12, (case, exclude, k)


# ------------------------------------------------------------------ hand-checked AP


def test_perfect_ranking_scores_one():
    assert average_precision(["a", "b", "c", "x", "y"], {"a", "b", "c"}) == 1.0
    assert average_precision([3, 1, 2], [1, 2, 3]) == 1.0


@pytest.mark.parametrize("r", [0, 1, 2, 3, 7, 50])
def test_single_positive_at_rank_r(r):
    # Worked by hand from the trapezoid rule: with j = 0, p1 = 1 / (r + 1), and p0 = 1 at
    # r = 0 but 0 / r = 0 for r > 0 (no hit among the r items before it, so the curve
    # sits at precision 0 just before the positive). Hence 1 at r = 0 and
    # (0 + 1 / (r + 1)) / 2 = 1 / (2 (r + 1)) after: r = 1 gives 0.25, as Oxford's
    # compute_ap loop gives for [negative, positive] (step 1: recall 0, precision 0;
    # step 2: recall 1, precision 1/2; area 1 x (0 + 1/2) / 2). The formula
    # (1/r + 1/(r+1)) / 2 would take p0 = 1/r, a precision with one hit too many.
    ranked = [f"neg{i}" for i in range(r)] + ["pos"] + ["neg_after"]
    expected = 1.0 if r == 0 else 1 / (2 * (r + 1))
    assert average_precision(ranked, ["pos"]) == pytest.approx(expected, abs=1e-15)
    assert reference_ap(ranked, ["pos"]) == pytest.approx(expected, abs=1e-15)


def test_two_positives_by_hand():
    # Positives at ranks 0 and 2, npos = 2: (1 + 1)/2 / 2 + (1/2 + 2/3)/2 / 2 = 19/24.
    assert average_precision([0, 1, 2], [0, 2]) == pytest.approx(19 / 24, abs=1e-15)
    # Half of the positives never retrieved: the same ranking scores half.
    assert average_precision([0, 1, 2], [0, 2, 8, 9]) == pytest.approx(19 / 48, abs=1e-15)


def test_no_positive_retrieved_scores_zero():
    assert average_precision(["x", "y", "z"], ["a", "b"]) == 0.0
    assert average_precision([], ["a"]) == 0.0
    # Everything retrieved is ignored: nothing is left, the positives were not found.
    assert average_precision(["a", "q"], ["a", "b"], ignore=["a", "q"]) == 0.0


def test_ignored_items_are_removed_before_ranking():
    # Junk in front of the positive does not lower AP; an ignored positive is not counted.
    assert average_precision(["junk1", "junk2", "pos"], ["pos"], ignore=["junk1", "junk2"]) == 1.0
    assert average_precision(["pos", "other"], ["pos", "other"], ignore=["other"]) == 1.0


# -------------------------------------------------------------------- mAP and recall


def test_query_is_excluded_from_its_ranking():
    truth = {"q": ["a", "b"]}
    without = {"q": ["x", "a", "b"]}
    with_query = {"q": ["q", "x", "a", "b"]}
    expected = average_precision(["x", "a", "b"], ["a", "b"])
    assert mean_average_precision(without, truth) == expected
    assert mean_average_precision(with_query, truth) == expected
    # Kept, the query is a negative in first place and costs AP.
    assert mean_average_precision(with_query, truth, exclude_query=False) < expected
    assert recall_at_k(with_query, truth, k=2) == {2: 1.0}
    assert recall_at_k(with_query, truth, k=2, exclude_query=False) == {2: 0.0}


def test_mean_and_recall_over_queries():
    truth = GroundTruth(
        positives={"q1": ["a"], "q2": ["b", "c"], "q3": ["d"]},
        ignore={"q3": ["junk"]},
    )
    rankings = {
        "q1": ["q1", "a", "z"],          # AP 1, first positive at rank 0
        "q2": ["z", "b", "y", "c"],      # AP 1/3 (below), first positive at rank 1
        "q3": ["junk", "z", "y", "x"],   # AP 0, never found
        "unused": ["a", "b"],            # not in the ground truth: not scored
    }
    # Positives at ranks 1 and 3, npos = 2: p0, p1 = 0/1, 1/2 then 1/3, 2/4.
    ap_q2 = ((0 + 1 / 2) / 2 + (1 / 3 + 2 / 4) / 2) / 2
    assert ap_q2 == pytest.approx(1 / 3, abs=1e-15)
    assert mean_average_precision(rankings, truth) == pytest.approx((1 + ap_q2 + 0) / 3, abs=1e-15)
    assert recall_at_k(rankings, truth) == {1: 1 / 3, 5: 2 / 3, 10: 2 / 3}
    assert recall_at_k(rankings, truth, k=np.array([2])) == {2: 2 / 3}


def test_missing_query_is_named():
    with pytest.raises(ValueError, match="'q2'"):
        mean_average_precision({"q1": ["a"]}, {"q1": ["a"], "q2": ["b"]})
    with pytest.raises(ValueError, match="'q2'"):
        recall_at_k({"q1": ["a"]}, {"q1": ["a"], "q2": ["b"]})


def test_query_without_positives_is_named():
    with pytest.raises(ValueError, match="query 'q2'.*no positives"):
        mean_average_precision({"q1": ["a"], "q2": ["b"]}, {"q1": ["a"], "q2": []})
    # Its only positive is itself, which exclude_query removes.
    with pytest.raises(ValueError, match="query 'q1'.*no positives"):
        mean_average_precision({"q1": ["q1"]}, {"q1": ["q1"]})
    with pytest.raises(ValueError, match="no positives"):
        average_precision(["a"], [])
    with pytest.raises(ValueError, match="no positives"):
        average_precision(["a"], ["a"], ignore=["a"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="no queries"):
        mean_average_precision({}, {})
    with pytest.raises(ValueError, match="more than once"):
        average_precision(["a", "b", "a"], ["a"])
    with pytest.raises(TypeError, match="ranked"):
        average_precision("abc", ["a"])
    with pytest.raises(TypeError, match="positives"):
        average_precision(["abc"], "abc")
    with pytest.raises(TypeError, match="rankings must be a mapping"):
        mean_average_precision([["a"]], {"q": ["a"]})
    with pytest.raises(TypeError, match="ground_truth"):
        mean_average_precision({"q": ["a"]}, [("q", ["a"])])
    with pytest.raises(ValueError, match="no positives entry"):
        GroundTruth({"q": ["a"]}, {"other": ["b"]})
    for bad_k in (0, -1, 1.5, True, "5", ()):
        with pytest.raises(ValueError, match="k must"):
            recall_at_k({"q": ["a"]}, {"q": ["a"]}, k=bad_k)


# ------------------------------------------------------------------- ground truths


def test_holidays_rule():
    names = ["100000.jpg", "100001.jpg", "100100.jpg", "100101.jpg", "100102.jpg",
             "100200.jpg", "100301.jpg"]
    assert holidays_ground_truth(names) == {
        "100000.jpg": ["100001.jpg"],
        "100100.jpg": ["100101.jpg", "100102.jpg"],
        # 100200 has no other image in its group: skipped; 100301 has no query.
    }


def test_holidays_rule_keeps_ids_as_given():
    paths = [Path("/data/holidays/100101.jpg"), Path("/data/holidays/100100.jpg"),
             Path("/data/holidays/100000.jpg"), Path("/data/holidays/100001.jpg")]
    truth = holidays_ground_truth(paths)
    assert truth == {paths[1]: [paths[0]], paths[2]: [paths[3]]}
    assert all(isinstance(key, Path) for key in truth)
    strings = ["/data/holidays/100300.JPG", "/data/holidays/100399.jpg"]
    assert holidays_ground_truth(strings) == {strings[0]: [strings[1]]}


def test_holidays_end_to_end():
    names = ["100000.jpg", "100001.jpg", "100100.jpg", "100101.jpg", "100102.jpg"]
    truth = holidays_ground_truth(names)
    rankings = {
        "100000.jpg": ["100000.jpg", "100001.jpg", "100100.jpg"],        # AP 1
        "100100.jpg": ["100100.jpg", "100000.jpg", "100101.jpg", "100102.jpg"],
    }
    second = average_precision(["100000.jpg", "100101.jpg", "100102.jpg"],
                               ["100101.jpg", "100102.jpg"])
    assert mean_average_precision(rankings, truth) == pytest.approx((1 + second) / 2, abs=1e-15)


def test_holidays_bad_names():
    with pytest.raises(ValueError, match="holiday_snap.jpg"):
        holidays_ground_truth(["100000.jpg", "/photos/holiday_snap.jpg"])
    for bad in ("+100.jpg", " 100.jpg", "1_000.jpg", "\u0661\u0660\u0660.jpg"):
        with pytest.raises(ValueError, match="not a Holidays image"):
            holidays_ground_truth([bad])
    with pytest.raises(ValueError, match="same Holidays image number 100001"):
        holidays_ground_truth(["a/100001.jpg", "b/100001.png"])
    with pytest.raises(TypeError):
        holidays_ground_truth("100000.jpg")


def test_folder_rule():
    paths = ["a/1.jpg", "b/3.jpg", "a/2.jpg", "c/4.jpg", "c/5.jpg", "c/6.jpg", "d/c/7.jpg"]
    assert folder_ground_truth(paths) == {
        "a/1.jpg": ["a/2.jpg"],
        "a/2.jpg": ["a/1.jpg"],
        "c/4.jpg": ["c/5.jpg", "c/6.jpg"],
        "c/5.jpg": ["c/4.jpg", "c/6.jpg"],
        "c/6.jpg": ["c/4.jpg", "c/5.jpg"],
        # b/3.jpg and d/c/7.jpg are alone in their folder: distractors, not queries.
    }
    as_paths = [Path("/x/cats/1.jpg"), Path("/x/cats/2.jpg"), Path("/x/dogs/1.jpg")]
    assert folder_ground_truth(as_paths) == {as_paths[0]: [as_paths[1]], as_paths[1]: [as_paths[0]]}
    with pytest.raises(ValueError, match="listed twice"):
        folder_ground_truth(["a/1.jpg", "a//1.jpg"])


def test_folder_rule_end_to_end():
    paths = ["a/1.jpg", "a/2.jpg", "b/1.jpg", "b/2.jpg"]
    truth = folder_ground_truth(paths)
    perfect = {p: [p] + truth[p] + [o for o in paths if o != p and o not in truth[p]] for p in paths}
    assert mean_average_precision(perfect, truth) == 1.0
    assert recall_at_k(perfect, truth, k=1) == {1: 1.0}
    worst = {p: [p] + [o for o in paths if o not in truth[p] and o != p] + truth[p] for p in paths}
    assert mean_average_precision(worst, truth) == pytest.approx(1 / 6, abs=1e-15)
    assert recall_at_k(worst, truth, k=(1, 2, 3)) == {1: 0.0, 2: 0.0, 3: 1.0}


# ------------------------------------------------- held-out queries: retrieval_ground_truth

TRAIN = ["s/train/a/1.jpg", "s/train/b/2.jpg", "s/train/a/3.jpg", "s/train/c/4.jpg", "s/train/a/5.jpg"]
TEST = ["s/test/a/6.jpg", "s/test/b/7.jpg", "s/test/d/8.jpg"]


def test_held_out_queries_take_their_positives_from_the_database():
    truth = retrieval_ground_truth(TEST, TRAIN)
    # test/a/6.jpg is not train/a/*, but both are group "a" of their collection; test/d
    # has no database image in its group: not a query.
    assert truth.positives == {
        "s/test/a/6.jpg": ["s/train/a/1.jpg", "s/train/a/3.jpg", "s/train/a/5.jpg"],
        "s/test/b/7.jpg": ["s/train/b/2.jpg"],
    }
    assert truth.ignore == {}  # no query is a database image
    assert folder_roots(TEST, TRAIN) == (PurePath("s/test"), PurePath("s/train"))
    # The same-collection rule on the query file finds nothing: its folders hold one image.
    assert folder_ground_truth(TEST) == {}

    # Scored by hand: train/a/3.jpg is a positive although it is not in the query file.
    rankings = {
        "s/test/a/6.jpg": ["s/train/a/1.jpg", "s/train/b/2.jpg", "s/train/a/3.jpg", "s/train/c/4.jpg",
                           "s/train/a/5.jpg"],
        "s/test/b/7.jpg": ["s/train/b/2.jpg", "s/train/a/1.jpg"],
    }
    # Query a: positives at ranks 0, 2, 4 of 3: (1 + 1)/2, (1/2 + 2/3)/2, (2/4 + 3/5)/2, / 3.
    ap_a = ((1 + 1) / 2 + (1 / 2 + 2 / 3) / 2 + (2 / 4 + 3 / 5) / 2) / 3
    assert mean_average_precision(rankings, truth) == pytest.approx((ap_a + 1) / 2, abs=1e-15)
    assert reference_ap(rankings["s/test/a/6.jpg"], truth.positives["s/test/a/6.jpg"]) == pytest.approx(ap_a)


def test_query_is_excluded_only_when_it_is_a_database_image():
    database = [*TRAIN, "s/train/b/9.jpg"]
    # An indexed query: itself ignored, neither positive nor negative.
    indexed = retrieval_ground_truth(["s/train/b/2.jpg"], database)
    assert indexed.positives == {"s/train/b/2.jpg": ["s/train/b/9.jpg"]}
    assert indexed.ignore == {"s/train/b/2.jpg": ["s/train/b/2.jpg"]}
    # All queries indexed: one collection, one root. On its own, the query below would
    # have the root "r/a" and the group "x", which is "a/x" in the database.
    nested = ["r/a/1.jpg", "r/a/x/2.jpg", "r/a/x/3.jpg"]
    assert folder_roots(["r/a/x/2.jpg"], nested) == (PurePath("r"), PurePath("r"))
    assert retrieval_ground_truth(["r/a/x/2.jpg"], nested).positives == {"r/a/x/2.jpg": ["r/a/x/3.jpg"]}
    # A held-out query of the same group: nothing ignored, train/b/2.jpg is a positive.
    held_out = retrieval_ground_truth(["s/test/b/7.jpg"], database)
    assert held_out.positives == {"s/test/b/7.jpg": ["s/train/b/2.jpg", "s/train/b/9.jpg"]}
    assert held_out.ignore == {}

    ranked = ["s/train/b/2.jpg", "s/train/a/1.jpg", "s/train/b/9.jpg"]
    for exclude in (True, False):
        # The ignore list removes the indexed query even with exclude_query=False.
        assert mean_average_precision({"s/train/b/2.jpg": ranked}, indexed, exclude_query=exclude) == 1 / 4
        assert mean_average_precision({"s/test/b/7.jpg": ranked}, held_out, exclude_query=exclude) == (
            pytest.approx(((1 + 1) / 2 + (1 / 2 + 2 / 3) / 2) / 2, abs=1e-15))


def test_same_collection_matches_the_single_list_rules():
    rng = np.random.default_rng(3)
    for case in range(40):
        ids = [f"root/g{rng.integers(0, 5)}/sub{rng.integers(0, 2)}/{i}.jpg" for i in range(int(rng.integers(1, 20)))]
        truth = retrieval_ground_truth(ids, ids)
        assert truth.positives == folder_ground_truth(ids), case
        assert truth.ignore == {q: [q] for q in truth.positives}
    holidays = ["h/100000.jpg", "h/100001.jpg", "h/100100.jpg", "h/100101.jpg", "h/100102.jpg",
                "h/100200.jpg", "h/100301.jpg"]
    assert retrieval_ground_truth(holidays, holidays, "holidays").positives == holidays_ground_truth(holidays)


def test_holidays_queries_apart_from_the_database():
    database = ["db/100000.jpg", "db/100001.jpg", "db/100002.jpg", "db/100100.jpg", "db/100101.jpg",
                "db/flickr_0001.jpg", "db/100200.jpg"]
    queries = ["q/100000.jpg", "q/100100.jpg", "q/100200.jpg", "q/100300.jpg"]
    truth = retrieval_ground_truth(queries, database, "holidays")
    # Positives from the database, the query's own number ignored wherever it is stored;
    # 100200 has no other image, 100300 no image at all in the database; the Flickr
    # image is a distractor.
    assert truth.positives == {"q/100000.jpg": ["db/100001.jpg", "db/100002.jpg"],
                               "q/100100.jpg": ["db/100101.jpg"]}
    assert truth.ignore == {"q/100000.jpg": ["db/100000.jpg"], "q/100100.jpg": ["db/100100.jpg"]}
    rankings = {"q/100000.jpg": ["db/100000.jpg", "db/100001.jpg", "db/flickr_0001.jpg", "db/100002.jpg"],
                "q/100100.jpg": ["db/100100.jpg", "db/100101.jpg"]}
    expected = (((1 + 1) / 2 + (1 / 2 + 2 / 3) / 2) / 2 + 1) / 2
    assert mean_average_precision(rankings, truth) == pytest.approx(expected, abs=1e-15)


def test_roots():
    # One folder per collection: the group is still that folder's name.
    assert retrieval_ground_truth(["t/a/1.jpg"], ["r/a/2.jpg", "r/a/3.jpg"]).positives == {
        "t/a/1.jpg": ["r/a/2.jpg", "r/a/3.jpg"]}
    # A stray image directly in the database folder moves the inferred root up a level;
    # the roots given put it back.
    database = ["/d/train/a/1.jpg", "/d/train/b/2.jpg", "/d/train/x.jpg"]
    queries = ["/d/test/a/3.jpg", "/d/test/b/4.jpg"]
    assert retrieval_ground_truth(queries, database).positives == {}
    truth = retrieval_ground_truth(queries, database, query_root="/d/test", database_root=Path("/d/train"))
    assert truth.positives == {"/d/test/a/3.jpg": ["/d/train/a/1.jpg"], "/d/test/b/4.jpg": ["/d/train/b/2.jpg"]}
    assert folder_roots(queries, database, database_root="/d/train") == (PurePath("/d/test"), PurePath("/d/train"))
    with pytest.raises(ValueError, match="query image '/d/test/a/3.jpg' is not under the query root '/e'"):
        retrieval_ground_truth(queries, database, query_root="/e")
    with pytest.raises(ValueError, match="mix absolute and relative"):
        folder_roots(["a/1.jpg", "/b/2.jpg"], database)
    with pytest.raises(ValueError, match="folders"):
        retrieval_ground_truth(queries, database, "holidays", query_root="/d/test")
    with pytest.raises(ValueError, match="rule must be"):
        retrieval_ground_truth(queries, database, "oxford")
    with pytest.raises(ValueError, match="listed twice"):
        retrieval_ground_truth(queries, ["r/a/1.jpg", "r//a/1.jpg"])


# ------------------------------------------------------------ truncated rankings: top


def test_top_scores_the_first_n_results_after_the_ignored_ones():
    rng = np.random.default_rng(4)
    for case in range(300):
        ranked, positives, ignore = random_case(rng)
        if not set(positives) - set(ignore):
            continue
        top = int(rng.integers(1, 30))
        kept = [item for item in ranked if item not in set(ignore)][:top]
        expected = reference_ap(kept, positives, ignore)
        assert abs(average_precision(ranked, positives, ignore, top=top) - expected) <= 1e-12, case
        assert average_precision(ranked, positives, ignore, top=top) <= average_precision(ranked, positives, ignore)
    # The query itself (first) does not take one of the N places.
    rankings = {"q": ["q", "x", "a", "y", "b"]}
    assert mean_average_precision(rankings, {"q": ["a", "b"]}, top=2) == pytest.approx(1 / 4 / 2, abs=1e-15)
    assert mean_average_precision(rankings, {"q": ["a", "b"]}, top=4) == mean_average_precision(rankings, {"q": ["a", "b"]})


def test_recall_refuses_k_above_top():
    truth = {"q": ["a"]}
    rankings = {"q": ["x", "y", "a"]}  # a top-3 search
    assert recall_at_k(rankings, truth, k=(1, 3), top=3) == {1: 0.0, 3: 1.0}
    with pytest.raises(ValueError, match=r"k=5 is above top=3"):
        recall_at_k(rankings, truth, k=(1, 5), top=3)
    for bad in (0, -2, 1.5, True, "3"):
        with pytest.raises(ValueError, match="top must"):
            recall_at_k(rankings, truth, k=1, top=bad)
        with pytest.raises(ValueError, match="top must"):
            mean_average_precision(rankings, truth, top=bad)
