"""benchmarks/host_syncs.py: its table and its refusal on a machine without CUDA (the sync debug
mode it relies on is CUDA's; the GPU run is benchmarks/results/host_syncs_*_h100.json)."""

from collections import Counter

import pytest

from benchmarks import host_syncs


def test_table_lists_sites_by_count_with_the_rate(capsys):
    rows = host_syncs.table("render", Counter({"engine/a.py:1 (f)": 2, "engine/b.py:9 (g)": 6}), 4, "forward")
    assert rows == [{"site": "engine/b.py:9 (g)", "count": 6}, {"site": "engine/a.py:1 (f)", "count": 2}]
    assert "8 synchronisations, 2.00 per forward" in capsys.readouterr().out


def test_it_says_it_needs_a_cuda_gpu():
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        host_syncs.main(["--device", "cpu"])
