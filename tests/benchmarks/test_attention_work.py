"""benchmarks/attention.py --work-only on the CPU: gather's walked work at the 16k workload, from
the reference routing, against the density of the same selection."""

import json
import sys


def test_work_only_reports_gather_padding_over_the_density(tmp_path, monkeypatch):
    from benchmarks import attention
    path = tmp_path / "work.json"
    monkeypatch.setattr(sys, "argv", ["attention.py", "--work-only", "--sizes", "16k", "--inputs", "random",
                                      "--json", str(path)])
    attention.main()
    data = json.loads(path.read_text())
    (row,) = data["rows"]
    assert data["gather_block"] == list(attention.GATHER_BLOCK["cuda"])
    assert (row["size"], row["inputs"]) == ("16k", "random")
    assert 0 < row["density"] < row["gather_work"] < 1  # 64-row tiles pad some chunks' rows
    assert abs(row["work_over_density"] - row["gather_work"] / row["density"]) < 1e-3
