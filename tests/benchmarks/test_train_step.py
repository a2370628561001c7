"""benchmarks/train_step.py on the CPU: its batches are the trainer's real shapes, and its profiler
summary reads a step (the timings themselves are GPU figures, never asserted)."""

import torch

from benchmarks import train_step
from engine.default_model import DEFAULT_TRANSFORMER, PIXEL_TRANSFORMER
from engine.training import TrainingConfig


def test_batches_have_the_codec_latent_grid_and_the_token_budget():
    batch = train_step.make_batch(4, 8, 49152, "cpu")
    B, C, T, h, w = batch.latents.shape
    _, ph, pw = DEFAULT_TRANSFORMER["patch_size"]
    assert (h * 4, w * 4) == (128, 192)  # the frame codec's 4x smaller latent grid of the 128 x 192 frames
    assert T == 4 * 8 and B * T * (h // ph) * (w // pw) == 49152  # the tokens it says it has
    assert len(batch.text) == B and all(len(t) == 4 + 1 for t in batch.text)


def test_the_profile_names_the_busiest_ops_of_a_step():
    from diffusers import WanTransformer3DModel
    from engine.backbone import StoryTransformer
    torch.manual_seed(0)
    config = dict(PIXEL_TRANSFORMER, in_channels=4, out_channels=4, patch_size=(1, 4, 4), text_dim=384, num_layers=2)
    tr = StoryTransformer(WanTransformer3DModel(**config).train())
    opt = torch.optim.AdamW(tr.model.parameters(), lr=1e-5)
    batch = train_step.make_batch(2, 2, 2 * 2 * 96, "cpu")
    prof = train_step.profile_step(tr, opt, batch, TrainingConfig(moc=None), steps=1, top=5)
    assert prof["wall_ms_per_step"] > 0 and prof["device_busy_ms_per_step"] > 0
    assert prof["launches_per_step"] > 100  # a transformer step is hundreds of ops
    times = [k["ms_per_step"] for k in prof["top"]]
    assert len(times) == 5 and times == sorted(times, reverse=True) and times[0] > 0
    assert any("mm" in k["name"] for k in prof["top"])  # the linear layers are among the busiest
    # the engine's attention range and the optimizer's are reported apart, not counted as kernels
    assert "storyboard.attention" in prof["ranges_ms_per_step"]
    assert not any(train_step.is_range(k["name"]) for k in prof["top"])
    assert train_step.is_range("Optimizer.step#AdamW.step") and not train_step.is_range("aten::mm")


def test_walked_work_covers_the_attended_pairs_and_shrinks_with_the_tile():
    small = train_step.walked_work(16, training=True, shots=3, frames=4)
    large = train_step.walked_work(128, training=True, shots=3, frames=4)
    for r in (small, large):
        assert r["walked"] >= r["density"] > 0  # a tile walks every key any of its rows attends
    assert small["walked"] < large["walked"]  # fewer rows per tile, a smaller union to walk
    assert small["density"] == large["density"]  # the tile changes the walk, never the attention


def test_the_best_setup_is_the_fastest_over_all_shapes():
    rows = [{"moc_ms": 100.0, "moc_tile64_ms": 90.0, "moc_tile32_ms": 95.0},
            {"moc_ms": 200.0, "moc_tile64_ms": 230.0, "moc_tile32_ms": 180.0}]
    # 275 ms, against 300 and 320
    assert train_step.best_moc(rows) == {"backend": "triton", "tile": 32, "compiled": False}
    rows[0]["moc_gather_ms"], rows[1]["moc_gather_ms"] = 80.0, 150.0
    assert train_step.best_moc(rows) == {"backend": "gather", "tile": 128, "compiled": False}
    only_default = {"backend": "triton", "tile": 128, "compiled": False}
    assert train_step.best_moc([{"moc_ms": 5.0}]) == only_default  # only the default timed
    del rows[1]["moc_gather_ms"]  # failed on the second shape: its partial sum (80 ms) must not win
    rows[1]["moc_gather_error"] = "CompilationError"
    assert train_step.best_moc(rows) == {"backend": "triton", "tile": 32, "compiled": False}
    # --compile's rows (the H200 crash of 2026-11-29: "moc_tile64_compiled_ms" read as a tile)
    rows[0]["moc_tile64_compiled_ms"], rows[1]["moc_tile64_compiled_ms"] = 60.0, 150.0
    assert train_step.best_moc(rows) == {"backend": "triton", "tile": 64, "compiled": True}  # 210 ms
    rows[0]["dense_compiled_ms"] = 1.0  # dense is never a MoC setup
    assert train_step.best_moc(rows) == {"backend": "triton", "tile": 64, "compiled": True}
