"""benchmarks/quality_breakdown.py on the committed quality JSONs: the splits count every
appearance once, a file paired with itself has no discordant pairs, McNemar's p is exact."""

from pathlib import Path

import pytest

from benchmarks.quality_breakdown import main, mcnemar

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
A, B = RESULTS / "quality_run6b_moc100_h200.json", RESULTS / "quality_run8_h200.json"


def test_splits_and_pairs():
    got = main([str(A), str(B)])
    for b in got["breakdown"]:
        for table in ("framing_size", "shape"):
            right = sum(v[0] for v in b[table].values())
            total = sum(v[1] for v in b[table].values())
            assert total == got["paired"]["appearances"] and 0 <= right <= total
        assert sum(v[0] for v in b["shape"].values()) == sum(v[0] for v in b["framing_size"].values())
    q = got["paired"]
    assert q["both"] + q["only_first"] <= q["appearances"] and 0 < q["p_mcnemar"] <= 1
    same = main([str(A), str(A)])["paired"]
    assert same["only_first"] == same["only_second"] == 0 and same["p_mcnemar"] == 1.0


def test_mcnemar_is_the_exact_binomial_test():
    assert mcnemar(0, 0) == 1.0
    assert mcnemar(0, 5) == pytest.approx(2 / 32)  # all 5 discordant pairs one way
    assert mcnemar(3, 3) == 1.0
    with pytest.raises(SystemExit):
        main([str(A), str(A), str(A)])


def test_the_memory_split_counts_every_look_less_appearance_once():
    """On the committed three-way run: each table of the memory split holds exactly the summary's
    look-less appearances and right looks (the routing table those of shots with a routing entry),
    and a model with no memory (isolated shots) keeps fewer of them than MoC."""
    import json

    from benchmarks.quality_breakdown import memory_breakdown
    doc = json.loads((RESULTS / "quality.json").read_text())
    for variant in ("moc", "isolated"):
        counts = doc["summary"]["by_mode"]["joint"][variant]["counts"]
        m = memory_breakdown(doc, variant, "joint")
        for table in ("characters_in_shot", "shots_since_introduction"):
            assert sum(v[1] for v in m[table].values()) == counts["undescribed"]
            assert sum(v[0] for v in m[table].values()) == counts["identity_ok"]
        routed = sum(v[1] for v in m["routing"].values())
        assert (0 < routed <= counts["undescribed"]) if variant == "moc" else routed == 0
    moc, alone = (memory_breakdown(doc, v, "joint")["characters_in_shot"]["1"][0] for v in ("moc", "isolated"))
    assert moc > alone
