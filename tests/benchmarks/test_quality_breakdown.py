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
