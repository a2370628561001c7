"""benchmarks/multigpu.py runs on the CPU: 2 gloo processes, the tiny smoke model, its JSON."""

import json

from tests.engine.test_parallel import torchrun


def test_multigpu_benchmark_smoke(tmp_path):
    out = tmp_path / "multigpu.json"
    proc = torchrun("benchmarks/multigpu.py", "--smoke", "--stories", "smoke-a", "--repeats", "1", "--json", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world"] == 2 and result["backend"] == "gloo"
    for key in ("check_rel_err_dense", "check_rel_err_moc-chunked"):
        assert result[key] < 1e-5, key  # 2 processes compute what 1 does
    (row,) = result["rows"]
    assert row["story"] == "smoke-a" and row["tokens"] == 90 and row["ms_1"] > 0 and row["ms_2"] > 0
    assert row["scaling_efficiency"] == round(row["ms_1"] / (2 * row["ms_2"]), 3)
    assert "scaling" in proc.stdout or "efficiency" in proc.stdout  # the table
