"""One Wan transformer forward over a whole multi-shot story: MoC against dense attention.

The Wan2.1-1.3B architecture (30 layers, 12 heads x 128, dim 1536, ffn 8960, text dim 4096) with
random weights, bf16, batch 1, through the engine's own forward (engine/backbone.py: MoC
self-attention, per-shot cross-attention, per-shot timesteps). Default story: 8 shots x 15 latent
frames x 1,500 tokens (30 x 50 patches) = 180,000 tokens, the MoC-180k layout. Random weights
give near-random routing; the attention figures of benchmarks/attention.py bound what structured
activations would give. Before timing, a small story checks that the MoC forward with the fused
kernel matches the float32 reference backend.

    python benchmarks/wan_forward.py --json benchmarks/results/wan_forward_h100.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import WanTransformer3DModel  # noqa: E402

from benchmarks.attention import time_ms  # noqa: E402  (median of CUDA-event timings)
from engine.backbone import StoryTransformer, make_cross_plan  # noqa: E402
from engine.moc import MoCConfig, TokenLayout  # noqa: E402
from engine.processors import ForwardPlan, SelfAttentionPlan  # noqa: E402

WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)


def story_inputs(st: StoryTransformer, shots: int, frames: int, h: int, w: int, device, dtype, seed=0):
    """Latents, per-shot timesteps (shot s at its own noise level), text and the plan pieces."""
    g = torch.Generator(device=device).manual_seed(seed)
    layout = TokenLayout(frame_tokens=st.frame_tokens(h, w), shot_frames=(frames,) * shots)
    latents = torch.randn(1, 16, shots * frames, h, w, generator=g, device=device, dtype=dtype)
    shot_of_token = torch.arange(layout.num_tokens, device=device) // (frames * layout.frame_tokens)
    timestep = (900.0 - 100.0 * (shot_of_token % 8)).float()[None]  # (1, N): later shots cleaner
    text_dim = st.model.config.text_dim  # 4096: umT5's width
    segments = [[torch.randn(24, text_dim, generator=g, device=device, dtype=dtype) for _ in range(shots + 1)]]
    live = [(*layout.shot_range(s), s) for s in range(shots)]
    text, cross = make_cross_plan(segments, live, device)
    rotary = st.rotary(0, shots * frames, h, w, device)
    return layout, latents, timestep, text.to(dtype), cross, rotary


def forward(st, layout, latents, timestep, text, cross, rotary, moc: MoCConfig | None, backend: str):
    plan = ForwardPlan(self_attn=SelfAttentionPlan(layout=layout, q_offset=0, moc=moc, backend=backend),
                       cross_attn=cross, rotary=rotary)
    with torch.no_grad():
        return st.forward(latents, timestep, text, plan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--frames", type=int, default=15, help="latent frames per shot")
    parser.add_argument("--latent-hw", type=int, nargs=2, default=[60, 100], help="latent height, width")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/wan_forward.py needs a CUDA GPU")
    device, dtype = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(**{**WAN_1_3B, "num_layers": args.layers}).to(dtype).eval()
    st = StoryTransformer(model)
    moc = MoCConfig(top_k=5)

    # correctness on a small story: fused kernel vs the float32 reference, whole model
    small = story_inputs(st, 3, 3, 16, 24, device, dtype, seed=1)
    ref = forward(st, *small, moc, "reference").float()
    fast = forward(st, *small, moc, "triton").float()
    rel_err = float((fast - ref).norm() / ref.norm())
    print(f"small story ({small[0].num_tokens} tokens): triton vs reference forward rel. error {rel_err:.2e}")

    layout, *rest = story_inputs(st, args.shots, args.frames, *args.latent_hw, device, dtype)
    rows = []
    for name, cfg, backend in [("dense-cudnn", None, "auto"), ("moc-triton", moc, "triton"), ("moc-auto", moc, "auto")]:
        torch.cuda.reset_peak_memory_stats()
        ms = time_ms(lambda: forward(st, layout, *rest, cfg, backend), args.repeats, warmup=1)
        rows.append({"tokens": layout.num_tokens, "layers": args.layers, "attention": name,
                     "forward_ms": round(ms, 1), "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)})
        print(rows[-1], flush=True)
    dense_ms = rows[0]["forward_ms"]
    for r in rows:
        r["speedup_vs_dense"] = round(dense_ms / r["forward_ms"], 2)
    print(f"{'attention':>12} {'tokens':>7} {'layers':>6} {'forward ms':>11} {'speed-up':>9} {'peak GiB':>9}")
    for r in rows:
        print(f"{r['attention']:>12} {r['tokens']:>7} {r['layers']:>6} {r['forward_ms']:>11.1f} "
              f"{r['speedup_vs_dense']:>8.2f}x {r['peak_mem_gib']:>9.2f}")
    if args.json:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "model": "Wan2.1-1.3B architecture, random weights, bf16", "top_k": 5,
                "small_story_rel_err_triton_vs_reference": rel_err, "rows": rows}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()
