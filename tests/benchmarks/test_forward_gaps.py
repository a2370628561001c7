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
    trace = [event("k1", 0, 100 * ms), event("k2", 90 * ms, 200 * ms), event("nvjet_tst_128x256", 2200 * ms, 2300 * ms),
             event("storyboard.attention", 0, 2400 * ms),  # a range's device span: not busy time
             event("k4", 2300 * ms + 20, 2400 * ms), event("aten::item", 150 * ms, 2250 * ms, DeviceType.CPU),
             event("outer", 0, 3000 * ms, DeviceType.CPU)]
    out = forward_gaps.gaps(trace, cuda=True, top=5)
    assert out["busy_ms"] == 400.0 and out["span_ms"] == 2400.0
    assert out["idle_ms"] == 2000.0 and out["gaps_over_1ms"] == 1  # the 20 us gap is launch spacing
    assert out["idle_in_gaps_under_50us_ms"] == 0.0  # 0.02 ms, rounded
    first = out["gaps"][0]
    assert first["ms"] == 2000.0 and first["after_kernel"] == "k2" and first["before_kernel"] == "nvjet_tst_128x256"
    assert first["host_ops"] == ["aten::item", "outer"]  # innermost first
    assert out["gaps"][1]["ms"] == 0.02
    assert out["kernels"] == 4 and out["gemm_kernels"] == 1 and out["gemm_busy_ms"] == 100.0


def test_the_script_runs_on_the_cpu(tmp_path):
    out = tmp_path / "g.json"
    from engine.processors import MoCSelfAttention
    attend = MoCSelfAttention._attend
    assert forward_gaps.main(["--tiny", "--device", "cpu", "--shots", "2", "--frames", "2",
                              "--variants", "moc-auto,dense-cudnn,no-self-attention", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [r["variant"] for r in rows] == ["moc-auto", "dense-cudnn", "no-self-attention"]
    assert all(r["wall_ms"] > 0 and r["busy_ms"] > 0 for r in rows)
    base = rows[2]["wall_ms"]
    assert result["self_attention_ms"] == {r["variant"]: round(r["wall_ms"] - base, 1) for r in rows[:2]}
    assert MoCSelfAttention._attend is attend  # the skip is undone


def test_skipping_self_attention_changes_the_output_and_only_inside(tmp_path):
    import torch
    from diffusers import WanTransformer3DModel
    from benchmarks.wan_forward import forward, story_inputs
    from engine.backbone import StoryTransformer
    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16,
                                  out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32, num_layers=1).eval()
    st = StoryTransformer(model)
    inputs = story_inputs(st, 2, 2, 4, 4, torch.device("cpu"), torch.float32)
    full = forward(st, *inputs, None, "auto")
    with forward_gaps.skip_self_attention():
        skipped = forward(st, *inputs, None, "auto")
    assert not torch.allclose(full, skipped)  # attention was skipped
    assert torch.equal(forward(st, *inputs, None, "auto"), full)  # and is back after
