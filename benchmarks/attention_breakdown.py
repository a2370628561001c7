"""Where the MoC-Triton time goes at one size: routing stages, plan builds, forward and backward.

    python benchmarks/attention_breakdown.py --size 180k --inputs structured
Prints one line per stage (median ms, CUDA events). For reading alongside benchmarks/attention.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.attention import FRAME_TOKENS, HEAD_DIM, HEADS, TOP_K, time_ms  # noqa: E402
from benchmarks.workload import moc_layout, random_qkv, structured_qkv  # noqa: E402
from engine.moc import MoCConfig, Selection, forced_links, route  # noqa: E402
from engine.moc.triton_attention import (key_blocks, key_ranges, kernel_plan, tile_lists,  # noqa: E402
                                         triton_moc_attention)
from engine.moc.triton_routing import route_triton, triton_chunk_descriptors  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="180k", choices=list(FRAME_TOKENS))
    parser.add_argument("--inputs", default="structured", choices=["structured", "random"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    layout = moc_layout(frame_tokens=FRAME_TOKENS[args.size])
    config = MoCConfig(top_k=TOP_K)
    make = structured_qkv if args.inputs == "structured" else random_qkv
    q, k, v = make(layout, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, seed=0)
    sel = route(q, k, layout, config, impl="triton")
    forced = forced_links(layout, config).cuda()
    qg, kg, vg = [t.detach().requires_grad_() for t in (q, k, v)]
    out = triton_moc_attention(qg, kg, vg, sel)
    do = torch.randn_like(out)
    torch.autograd.grad(out, (qg, kg, vg), do)
    r = args.repeats
    stages = {
        "descriptors": lambda: triton_chunk_descriptors(k, layout),
        "route (all)": lambda: route_triton(q, k, layout, config),
        "Selection.build": lambda: Selection.build(layout, config.tile, forced, sel.routed, 0),
        "key_ranges": lambda: key_ranges(sel),
        "kernel_plan": lambda: kernel_plan(sel),
        "tile_lists": lambda: tile_lists(sel),
        "key_blocks": lambda: key_blocks(sel, 128, "cuda"),
        "attention fwd": lambda: triton_moc_attention(q, k, v, sel),
        "attention fwd+bwd": lambda: torch.autograd.grad(triton_moc_attention(qg, kg, vg, sel), (qg, kg, vg), do),
    }
    for name, fn in stages.items():
        print(f"{name:>20}: {time_ms(fn, r):9.3f} ms", flush=True)
    out = triton_moc_attention(qg, kg, vg, sel)
    print(f"{'backward only':>20}: {time_ms(lambda: torch.autograd.grad(out, (qg, kg, vg), do, retain_graph=True), r):9.3f} ms")
    # per-kernel device time over one routing + forward + backward
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        s = route(q, k, layout, config, impl="triton")
        torch.autograd.grad(triton_moc_attention(qg, kg, vg, s), (qg, kg, vg), do)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    moc, dense = sel.attention_flops(HEAD_DIM)
    work = float(kernel_plan(sel).ranges.keys_per_tile().sum() * sel.tile / (HEADS * layout.num_tokens ** 2))
    print(f"density {sel.density():.4f}  work {work:.4f}  union/tile {sel.stats().union_chunks_per_tile:.2f}  "
          f"moc TFLOP {moc / 1e12:.2f}")


if __name__ == "__main__":
    main()
