"""GPU benchmark: MoC attention (fused Triton, FlexAttention) against dense SDPA (cuDNN, flash).

Workload (MOC.md): 8 shots x 15 latent frames x F tokens per frame, 12 heads x 128, bf16, batch 1,
one chunk per frame, k = 5, shot anchor, causal across shots. F = 1,500 is MoC-180k (180,000
tokens); F = 544 and 136 give the same structure at 65,280 and 16,320 tokens.
Inputs: "structured" (benchmarks/workload.py: per frame and head a shared frame vector plus
per-token noise, frame vectors repeating every 2 shots) and "random" (i.i.d. normal, the worst
case: per-token top-k is near random, so a tile's union approaches every earlier chunk).

Columns: fwd_ms is routing + attention forward (for dense: attention); fwd_bwd_ms adds the
backward (dq, dk, dv); routing_ms is the fused routing alone (descriptors, top-k, Selection);
attn_ms is the attention given the selection (plan or BlockMask build included); density is the
attended fraction of (query, key) pairs; work is the fraction the Triton kernel walks (its key
ranges, before rounding to blocks); union_chunks_per_tile is the mean size of a 128-query tile's
chunk union (routed_chunks_per_tile: its routed part, against k; kernel_union_chunks_per_tile: the
same for the Triton kernel's tiles, whose rows are sorted by routed set); peak_mem_gib is the peak of
torch's allocator over one forward + backward, inputs and gradients included.

    python benchmarks/attention.py --json benchmarks/results/attention_h100.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.workload import moc_layout, random_qkv, structured_qkv  # noqa: E402
from engine.moc import MoCConfig, route  # noqa: E402
from engine.moc import attend as model_attention  # noqa: E402  (the model's entry point)
from engine.moc.flex import build_block_mask, flex_moc_attention  # noqa: E402
from engine.moc.triton_attention import kernel_plan, triton_moc_attention  # noqa: E402
from engine.moc.triton_gather import gather_moc_attention  # noqa: E402

FRAME_TOKENS = {"16k": 136, "64k": 544, "180k": 1500}
HEADS, HEAD_DIM, TOP_K = 12, 128, 5
BACKENDS = ("moc-triton", "moc-gather", "moc-flex", "moc-auto", "dense-cudnn", "dense-flash")
FORWARD_ONLY = ()  # backends without a backward (their fwd_bwd columns stay empty)


def time_ms(fn, repeats: int, warmup: int = 2) -> float:
    """Median of `repeats` runs, timed with CUDA events, after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def peak_gib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2 ** 30


def dense_fn(backend: SDPBackend):
    def attend(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)
    return attend


def bench_size(size: str, inputs: str, backends: tuple[str, ...], repeats: int) -> list[dict]:
    layout = moc_layout(frame_tokens=FRAME_TOKENS[size])
    config = MoCConfig(top_k=TOP_K)
    make = structured_qkv if inputs == "structured" else random_qkv
    q, k, v = make(layout, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, seed=0)
    q, k, v = [t.requires_grad_() for t in (q, k, v)]
    do = torch.randn_like(q)
    N = layout.num_tokens

    def routing():
        return route(q.detach(), k.detach(), layout, config, impl="triton")

    sel = routing()
    stats = sel.stats()
    plan = kernel_plan(sel)
    work = float(plan.ranges.keys_per_tile().sum() * sel.tile / (HEADS * N * N))  # tile rows x keys walked
    kernel_union = float(plan.tiles.tile_count.float().mean())
    routing_ms = time_ms(routing, repeats)
    moc_attend = {
        "moc-triton": lambda s: triton_moc_attention(q, k, v, s),
        "moc-flex": lambda s: flex_moc_attention(q, k, v, s, block_mask=build_block_mask(s)),
        "moc-gather": lambda s: gather_moc_attention(q, k, v, s),
    }
    reference_out = None
    rows = []
    for backend in backends:
        dispatch = None
        if backend == "moc-auto":
            # the model's entry point: dense SDPA when the cost model says it is faster, else MoC
            fwd = attn = lambda: model_attention(q, k, v, layout, config, backend="auto")[0]  # noqa: E731
            with torch.no_grad():
                chosen = model_attention(q, k, v, layout, config, backend="auto")[1]
            dispatch = "dense" if chosen is None else str(chosen.info["backend"])
            density = 1.0 if chosen is None else sel.density()
            union = float(sel.layout.num_chunks) if chosen is None else stats.union_chunks_per_tile
            routed_union = float("nan") if chosen is None else stats.routed_chunks_per_tile
        elif backend in moc_attend:
            attend = moc_attend[backend]
            fwd = lambda: attend(routing())  # noqa: E731
            attn = lambda: attend(sel)  # noqa: E731
            density, union, routed_union = sel.density(), stats.union_chunks_per_tile, stats.routed_chunks_per_tile
        else:
            kind = SDPBackend.CUDNN_ATTENTION if backend == "dense-cudnn" else SDPBackend.FLASH_ATTENTION
            fwd = attn = lambda kind=kind: dense_fn(kind)(q, k, v)  # noqa: E731
            density, union, routed_union = 1.0, float(sel.layout.num_chunks), float("nan")

        def fwd_bwd():
            torch.autograd.grad(fwd(), (q, k, v), do)

        with torch.no_grad():
            out = attn()  # also compiles / autotunes
        if backend in ("moc-flex", "moc-gather") and reference_out is not None:
            err = float((out.float() - reference_out).norm() / reference_out.norm())
        else:
            err = float("nan")
        if backend == "moc-triton":
            reference_out = out.float()
        backward = backend not in FORWARD_ONLY
        if backward:
            fwd_bwd()
        with torch.no_grad():
            fwd_ms = time_ms(fwd, repeats)
            attn_ms = time_ms(attn, repeats)
        fwd_bwd_ms = time_ms(fwd_bwd, max(3, repeats // 2)) if backward else float("nan")
        peak = peak_gib(fwd_bwd) if backward else float("nan")
        with torch.no_grad():
            fwd_peak = peak_gib(fwd)
        moc_flops, dense_flops = sel.attention_flops(HEAD_DIM)
        flops = dense_flops if backend.startswith("dense") or dispatch == "dense" else moc_flops
        rows.append({
            "tokens": N, "size": size, "backend": backend, "inputs": inputs,
            "fwd_ms": round(fwd_ms, 3), "fwd_bwd_ms": round(fwd_bwd_ms, 3) if backward else None,
            "routing_ms": round(routing_ms, 3) if backend.startswith("moc") and dispatch != "dense" else 0.0,
            "attn_ms": round(attn_ms, 3), "attn_tflops": round(flops / attn_ms / 1e9, 1),
            "density": round(density, 4), "work": round(work, 4) if backend == "moc-triton" else None,
            "union_chunks_per_tile": round(union, 2), "routed_chunks_per_tile": round(routed_union, 2),
            "kernel_union_chunks_per_tile": round(kernel_union, 2) if backend == "moc-triton" else None,
            "peak_mem_gib": round(peak, 3) if backward else None, "fwd_peak_mem_gib": round(fwd_peak, 3),
            "rel_err_vs_triton": None if err != err else round(err, 5),
            "dispatch": dispatch,
        })
        print(format_row(rows[-1]), flush=True)
        del out
        torch.cuda.empty_cache()
    return rows


COLUMNS = [("tokens", 7), ("inputs", 10), ("backend", 11), ("fwd_ms", 9), ("fwd_bwd_ms", 10),
           ("routing_ms", 10), ("attn_ms", 9), ("attn_tflops", 11), ("density", 7), ("work", 6),
           ("union_chunks_per_tile", 6), ("peak_mem_gib", 8), ("dispatch", 8)]


def format_row(row: dict) -> str:
    return " ".join(str(row[c] if row[c] is not None else "-").rjust(w) for c, w in COLUMNS)


def summary(rows: list[dict]) -> list[str]:
    """The issue's targets, as ratios from this one run."""
    out = []
    by = {(r["size"], r["inputs"], r["backend"]): r for r in rows}
    for size in FRAME_TOKENS:
        for inputs in ("structured", "random"):
            t, c, f = (by.get((size, inputs, b)) for b in ("moc-triton", "dense-cudnn", "moc-flex"))
            if not (t and c):
                continue
            line = (f"{size} {inputs}: fwd {c['fwd_ms'] / t['fwd_ms']:.2f}x vs cuDNN, "
                    f"fwd+bwd {c['fwd_bwd_ms'] / t['fwd_bwd_ms']:.2f}x vs cuDNN, "
                    f"peak mem {t['peak_mem_gib'] / c['peak_mem_gib']:.3f} of cuDNN's")
            if f:
                line += (f", attention {f['attn_ms'] / t['attn_ms']:.2f}x vs flex (same selection), "
                         f"fwd incl. routing {f['fwd_ms'] / t['fwd_ms']:.2f}x vs flex")
            gather = by.get((size, inputs, "moc-gather"))
            if gather:
                line += (f"; gather (per key chunk): fwd {c['fwd_ms'] / gather['fwd_ms']:.2f}x, "
                         f"fwd+bwd {c['fwd_bwd_ms'] / gather['fwd_bwd_ms']:.2f}x vs cuDNN, "
                         f"attention {t['attn_ms'] / gather['attn_ms']:.2f}x the tile kernel's speed")
            a = by.get((size, inputs, "moc-auto"))
            if a:
                line += (f"; auto entry point ({a['dispatch']}): fwd {c['fwd_ms'] / a['fwd_ms']:.2f}x, "
                         f"fwd+bwd {c['fwd_bwd_ms'] / a['fwd_bwd_ms']:.2f}x vs cuDNN")
            out.append(line)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(FRAME_TOKENS), choices=list(FRAME_TOKENS))
    parser.add_argument("--inputs", nargs="+", default=["structured", "random"], choices=["structured", "random"])
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per figure (median)")
    parser.add_argument("--json", type=Path, help="write the rows and the run's metadata here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/attention.py needs a CUDA GPU")
    # flex_attention recompiles for every size and BlockMask shape; the default limit of 8 would
    # drop it to its unfused eager path (a full score matrix) halfway through the table
    torch._dynamo.config.recompile_limit = 64
    device = torch.cuda.get_device_name()
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(" ".join(c.rjust(w) for c, w in COLUMNS))
    rows = []
    for size in args.sizes:
        for inputs in args.inputs:
            repeats = max(3, args.repeats // 2) if size == "180k" else args.repeats
            for row in bench_size(size, inputs, tuple(args.backends), repeats):
                rows.append({**row, "device": device, "date": date})
            if args.json:  # after every size, so that a cut-off run still leaves its rows
                write_json(args.json, rows, device, date)
    print("\n".join(summary(rows)))


def write_json(path: Path, rows: list[dict], device: str, date: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": device, "date": date, "torch": torch.__version__, "triton": __import__("triton").__version__,
            "heads": HEADS, "head_dim": HEAD_DIM, "top_k": TOP_K, "dtype": "bfloat16",
            "workload": "8 shots x 15 frames x frame_tokens (136 / 544 / 1500), chunk = frame, shot anchor, causal "
                        "across shots; structured inputs per benchmarks/workload.py, random = i.i.d. normal",
            "summary": summary(rows), "rows": rows}
    path.write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()
