"""CPU benchmark: reference routing and reference MoC attention against dense SDPA.

CPU timings are for trends (how routing and the reference scale with length), not targets.
Prints a table and writes JSON:  python benchmarks/routing_cpu.py --json benchmarks/results/routing_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.workload import moc_layout, random_qkv, structured_qkv  # noqa: E402
from engine.moc import MoCConfig, moc_attention, route  # noqa: E402

SIZES = [  # (shots, frames per shot, tokens per frame): 1,920 / 7,680 / 15,000 tokens
    (4, 4, 120),
    (4, 8, 240),
    (8, 5, 375),
]


def best_of(fn, repeats: int) -> float:
    """Best wall time in ms (CPU: min is the least noisy estimate)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def run(heads: int, head_dim: int, top_k: int, repeats: int) -> list[dict]:
    rows = []
    config = MoCConfig(top_k=top_k)
    for shots, frames, frame_tokens in SIZES:
        layout = moc_layout(shots, frames, frame_tokens)
        for inputs in ("structured", "random"):
            make = structured_qkv if inputs == "structured" else random_qkv
            q, k, v = make(layout, heads, head_dim)
            sel = route(q, k, layout, config)
            rows.append(dict(
                tokens=layout.num_tokens, inputs=inputs, heads=heads, head_dim=head_dim, top_k=top_k,
                routing_ms=best_of(lambda: route(q, k, layout, config), repeats),
                reference_ms=best_of(lambda: moc_attention(q, k, v, sel, backend="reference"), repeats),
                dense_sdpa_ms=best_of(lambda: F.scaled_dot_product_attention(q, k, v), repeats),
                density=sel.density(),
                union_chunks_per_tile=sel.stats().union_chunks_per_tile,
                routed_chunks_per_tile=sel.stats().routed_chunks_per_tile,
            ))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = run(args.heads, args.head_dim, args.top_k, args.repeats)
    print(f"{'tokens':>7} {'inputs':>10} {'routing ms':>11} {'reference ms':>13} {'dense ms':>9} "
          f"{'density':>8} {'union/tile':>10} {'routed/tile':>11}")
    for r in rows:
        print(f"{r['tokens']:>7} {r['inputs']:>10} {r['routing_ms']:>11.1f} {r['reference_ms']:>13.1f} "
              f"{r['dense_sdpa_ms']:>9.1f} {r['density']:>8.3f} {r['union_chunks_per_tile']:>10.1f} "
              f"{r['routed_chunks_per_tile']:>11.1f}")
    if args.json:
        meta = dict(device=f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
                    date=datetime.date.today().isoformat(), torch=torch.__version__)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([{**meta, **r} for r in rows], indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
