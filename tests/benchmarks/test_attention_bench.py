"""benchmarks/attention.py on the CPU at its tiny size: the gather rows with either step 1, the
forced links alone both ways, and their JSON (the timings themselves are GPU figures, never asserted).
Under the Triton interpreter, in its own process (scripts/test.sh's `interpret` marker)."""

import json
import os

import pytest

from tests.engine.moc.conftest import interpreter_numpy_shim

pytestmark = [pytest.mark.interpret,
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="needs TRITON_INTERPRET=1 in its own pytest process")]


def reject(constant):
    raise ValueError(f"not JSON: {constant}")


def test_tiny_run_times_gather_both_ways_and_the_forced_links_alone(tmp_path, monkeypatch):
    from benchmarks import attention
    from engine.moc import triton_gather
    backends = ("moc-gather", "moc-gather-sdpa-forced", "moc-gather-in-place", "moc-gather-pieces", "forced-triton",
                "forced-sdpa")
    monkeypatch.setattr(attention, "PIECE_BYTES", 1)  # the pieces row in pieces of one tile of rows
    budget = triton_gather.GATHER_FWD_PIECE_BYTES
    with interpreter_numpy_shim():
        rows = attention.bench_size("tiny", "structured", backends, repeats=1, kernels=True)
    by = {r["backend"]: r for r in rows}
    assert set(by) == set(backends)
    assert by["moc-gather-sdpa-forced"]["forced"] == "sdpa" and by["moc-gather"]["forced"] == "triton"
    assert by["forced-sdpa"]["rel_err_vs_triton"] < 1e-4  # the two ways of step 1 agree: out and lse
    assert by["forced-sdpa"]["lse_err_vs_triton"] < 1e-4
    assert by["forced-sdpa"]["fwd_bwd_ms"] is None and by["moc-gather"]["fwd_bwd_ms"] > 0
    assert by["forced-sdpa"]["density"] < by["moc-gather"]["density"]  # the forced links are part of it
    for name in backends[:4]:  # every gather row: what it walks, its padded pairs, at least the density
        assert by[name]["work"] == by["moc-gather"]["work"] >= by[name]["density"]
    assert by["forced-sdpa"]["work"] is None
    for r in rows:  # the per-kernel split of one forward, heaviest first
        split = r["kernels"]
        assert split and all(k["ms"] > 0 and k["calls"] >= 1 for k in split)
        assert [k["ms"] for k in split] == sorted((k["ms"] for k in split), reverse=True)
    for name in ("moc-gather", "moc-gather-sdpa-forced"):  # and of one forward + backward
        both = by[name]["kernels_fwd_bwd"]
        assert both and sum(k["ms"] for k in both) > 0
    assert "kernels_fwd_bwd" not in by["forced-sdpa"]  # forward only
    in_place = by["moc-gather-in-place"]  # gather without per-pair buffers: forward only, same selection
    assert in_place["fwd_bwd_ms"] is None and in_place["density"] == by["moc-gather"]["density"]
    assert in_place["fwd_ms"] > 0 and "kernels_fwd_bwd" not in in_place
    pieces = by["moc-gather-pieces"]  # the buffered merge in query pieces: forward only; the budget put back
    assert pieces["fwd_bwd_ms"] is None and pieces["density"] == by["moc-gather"]["density"] and pieces["fwd_ms"] > 0
    assert triton_gather.GATHER_FWD_PIECE_BYTES == budget
    lines = attention.summary([{**r, "device": "cpu", "date": ""} for r in rows])
    assert any("forced links alone" in line for line in lines)
    assert any("gather attention with forced=sdpa" in line for line in lines)
    path = tmp_path / "attention.json"
    attention.write_json(path, rows, "cpu", "")
    meta = json.loads(path.read_text(), parse_constant=reject)  # strict JSON: no NaN
    assert meta["heads"] == attention.TINY["heads"] and len(meta["rows"]) == len(backends)
    assert meta["render_merge"] == attention.triton_gather.GATHER_RENDER_MERGE  # what moc-auto's forward ran


def test_the_command_line_check_runs_the_triton_rows_under_the_interpreter(tmp_path, monkeypatch):
    """`TRITON_INTERPRET=1 python benchmarks/attention.py --device cpu` (what its help offers as the
    CPU check) runs the Triton rows; it applies the interpreter's numpy patch itself."""
    from benchmarks import attention
    path = tmp_path / "cli.json"
    monkeypatch.setattr("sys.argv", ["attention.py", "--device", "cpu", "--backends", "moc-gather-sdpa-forced",
                                     "moc-gather-in-place", "dense-cudnn", "--render-merge", "in_place",
                                     "--json", str(path)])
    attention.main()
    meta = json.loads(path.read_text(), parse_constant=reject)
    # dense-cudnn is a GPU row: left out on the CPU
    assert {r["backend"] for r in meta["rows"]} == {"moc-gather-sdpa-forced", "moc-gather-in-place"}
    assert meta["render_merge"] == "in_place" and all(r["fwd_ms"] > 0 for r in meta["rows"])
    attention.triton_gather.GATHER_RENDER_MERGE = "buffers"  # the module-level setting, as it was


def test_the_summary_sets_gather_against_the_ideal_of_its_density():
    from benchmarks import attention
    rows = [{"size": "180k", "inputs": "random", "backend": "dense-cudnn", "attn_ms": 350.0, "density": 1.0},
            {"size": "180k", "inputs": "random", "backend": "moc-gather", "attn_ms": 98.0, "density": 0.16}]
    line = next(x for x in attention.summary(rows) if "ideal" in x)
    assert "moc-gather attention 98.0 ms against the ideal 56.0 ms" in line and "1.75x the ideal" in line


def test_auto_rows_record_what_ran_with_and_without_gradients():
    from benchmarks import attention
    with interpreter_numpy_shim():
        rows = attention.bench_size("tiny", "random", ("moc-auto",), repeats=1)
    (row,) = rows
    assert isinstance(row["dispatch"], str) and isinstance(row["dispatch_grad"], str)
    assert row["fwd_bwd_ms"] > 0
    if row["dispatch"] in ("gather", "triton"):  # the walked work of what ran
        assert row["work"] >= row["density"]
