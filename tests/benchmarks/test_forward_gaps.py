"""benchmarks/forward_gaps.py and e2e.busy_ms: the interval arithmetic that says how long a GPU was
busy and where it idled (checked on made-up traces), and the script's CPU run end to end."""

import json
from types import SimpleNamespace

from torch.autograd import DeviceType

from benchmarks import e2e, forward_gaps


def event(name, start, end, device=DeviceType.CUDA):
    return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end), device_type=device)


def test_busy_time_is_the_union_of_overlapping_intervals():
    events = [event("a", 0, 10), event("b", 5, 15), event("c", 20, 30), event("d", 22, 25), event("empty", 40, 40)]
    assert e2e.busy_ms(events) == (15 + 10) / 1e3  # microseconds in, milliseconds out


def test_gaps_are_found_between_kernels_with_the_host_op_that_was_running():
    ms = 1000  # the profiler's clock is in microseconds
    trace = [event("k1", 0, 100 * ms), event("k2", 90 * ms, 200 * ms), event("k3", 2200 * ms, 2300 * ms),
             event("storyboard.attention", 0, 2400 * ms),  # a range's device span: not busy time
             event("k4", 2300 * ms + 20, 2400 * ms), event("aten::item", 150 * ms, 2250 * ms, DeviceType.CPU),
             event("outer", 0, 3000 * ms, DeviceType.CPU)]
    out = forward_gaps.gaps(trace, cuda=True, top=5)
    assert out["busy_ms"] == 400.0 and out["span_ms"] == 2400.0
    assert out["idle_ms"] == 2000.0 and out["gaps_over_1ms"] == 1  # the 20 us gap is launch spacing
    assert out["idle_in_gaps_under_50us_ms"] == 0.0  # 0.02 ms, rounded
    first = out["gaps"][0]
    assert first["ms"] == 2000.0 and first["after_kernel"] == "k2" and first["before_kernel"] == "k3"
    assert first["host_ops"] == ["aten::item", "outer"]  # innermost first
    assert out["gaps"][1]["ms"] == 0.02


def test_the_script_runs_on_the_cpu(tmp_path):
    out = tmp_path / "g.json"
    assert forward_gaps.main(["--tiny", "--device", "cpu", "--shots", "2", "--frames", "2",
                              "--variants", "moc-auto,dense-cudnn", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["moc-auto", "dense-cudnn"]
    assert all(r["wall_ms"] > 0 and r["busy_ms"] > 0 for r in rows)
