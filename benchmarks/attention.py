"""GPU benchmark: MoC attention (fused Triton, FlexAttention) against dense SDPA (cuDNN, flash).

Workload (MOC.md): 8 shots x 15 latent frames x F tokens per frame, 12 heads x 128, bf16, batch 1,
one chunk per frame, k = 5, shot anchor, causal across shots. F = 1,500 is MoC-180k (180,000
tokens); F = 544 and 136 give the same structure at 65,280 and 16,320 tokens.
Inputs: "structured" (benchmarks/workload.py: per frame and head a shared frame vector plus
per-token noise, frame vectors repeating every 2 shots) and "random" (i.i.d. normal, the worst
case: per-token top-k is near random, so a tile's union approaches every earlier chunk).

Step 1 of "gather" (the forced links: own shot, captions) runs per forced group through cuDNN
("moc-gather-sdpa-forced", forced="sdpa") or through the tile kernel ("moc-gather", forced="triton");
the engine picks per call (triton_gather.FORCED_DEFAULT: cuDNN without gradients, where it measured
faster, the tile kernel with them);
"forced-sdpa" and "forced-triton" time that step alone (no routing, forward), to set against
"dense-cudnn" (its block-diagonal share is the ideal); their rel_err / lse_err compare the two
ways of computing it (lse in log2 units: the cuDNN convention converted).
"moc-gather-graph" is routing + gather's forward replayed from one CUDA graph (engine/moc/graphed.py;
q, k, v copied into its buffers each call): MoC without its launch and host work, forward only.

Columns: fwd_ms is routing + attention forward (for dense: attention); fwd_bwd_ms adds the
backward (dq, dk, dv); routing_ms is the fused routing alone (descriptors, top-k, Selection);
attn_ms is the attention given the selection (plan or BlockMask build included); density is the
attended fraction of (query, key) pairs; work is the fraction the kernel that ran walks: the tile
kernels their tiles' key ranges (before rounding to blocks), gather the forced links at their
pairs and each routed chunk's query rows padded to whole BLOCK_M tiles (`gather_work`); work ÷
density is what the kernel does beyond the routed pairs; union_chunks_per_tile is the mean size of a 128-query tile's
chunk union (routed_chunks_per_tile: its routed part, against k; kernel_union_chunks_per_tile: the
same for the Triton kernel's tiles, whose rows are sorted by routed set); peak_mem_gib is the peak of
torch's allocator over one forward + backward, inputs and gradients included.

    python benchmarks/attention.py --json benchmarks/results/attention_h100.json
    python benchmarks/attention.py --sizes 180k --backends moc-gather moc-gather-sdpa-forced \
        forced-triton forced-sdpa dense-cudnn --json benchmarks/results/attention_forced_180k_h200.json
    python benchmarks/attention.py --device cpu   # a tiny story on the CPU: does it run
With TRITON_INTERPRET=1 the CPU run adds the Triton rows (Triton 3.6's interpreter needs numpy < 2.3
or the tests' patch: tests/benchmarks/test_attention_bench.py runs them so).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import time
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
from engine.moc.forced import sdpa_forced_attention, sdpa_forced_plan  # noqa: E402
from engine.moc.graphed import GraphedAttention  # noqa: E402
import engine.moc.attention as moc_attention_module
from engine.moc.interpret import interpreter_numpy_shim
from engine.moc import triton_gather
from engine.moc.triton_gather import (GATHER_BLOCK, forced_attention, forced_only, gather_moc_attention,  # noqa: E402
                                      gather_work)

FRAME_TOKENS = {"16k": 136, "64k": 544, "180k": 1500}
HEADS, HEAD_DIM, TOP_K = 12, 128, 5
# --device cpu: a tiny story of the same structure (3 shots x 3 frames x 19 tokens, 2 heads x 64,
# float32: the interpreter miscomputes bf16 dots), to check that the script runs, not to time it
TINY = {"shots": 3, "frames_per_shot": 3, "frame_tokens": 19, "heads": 2, "head_dim": 64}
BACKENDS = ("moc-triton", "moc-gather", "moc-gather-sdpa-forced", "moc-gather-in-place", "moc-gather-pieces",
            "moc-gather-graph", "moc-flex", "moc-auto", "forced-triton", "forced-sdpa", "dense-cudnn", "dense-flash")
# moc-gather-pieces: the buffered merge with a head's queries in pieces whose partial outputs stay
# under this many bytes (triton_gather.GATHER_FWD_PIECE_BYTES, set for the row alone)
PIECE_BYTES = 64 << 20
# backends without a backward (their fwd_bwd columns stay empty); moc-gather-graph: routing and
# gather's forward replayed from one CUDA graph (engine/moc/graphed.py), the inputs copied in
FORWARD_ONLY = ("forced-triton", "forced-sdpa", "moc-gather-graph", "moc-gather-in-place", "moc-gather-pieces")
CPU_BACKENDS = ("forced-sdpa",)  # what --device cpu runs without Triton; the rest need TRITON_INTERPRET=1
CPU_INTERPRETED = ("moc-triton", "moc-gather", "moc-gather-sdpa-forced", "moc-gather-in-place", "moc-gather-pieces",
                   "forced-triton")


def time_ms(fn, repeats: int, warmup: int = 2) -> float:
    """Median of `repeats` runs, timed with CUDA events (wall clock without a GPU), after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if not torch.cuda.is_available():
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def in_pieces(fn, *args, **kwargs):
    """fn(*args, **kwargs) with triton_gather.GATHER_FWD_PIECE_BYTES at PIECE_BYTES (the
    moc-gather-pieces row), put back after."""
    saved = triton_gather.GATHER_FWD_PIECE_BYTES
    triton_gather.GATHER_FWD_PIECE_BYTES = PIECE_BYTES
    try:
        return fn(*args, **kwargs)
    finally:
        triton_gather.GATHER_FWD_PIECE_BYTES = saved


def peak_gib(fn) -> float:
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2 ** 30


def kernel_split(fn, top: int = 10) -> list[dict]:
    """Where one run of `fn` spends its time, per kernel: the `top` kernels by device time on the
    GPU (the ops by their own CPU time without one), each {"name", "ms", "calls"}."""
    from torch.profiler import ProfilerActivity, profile
    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        if cuda and e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = e.device_time_total if cuda else e.self_cpu_time_total
        if us > 0:
            rows.append({"name": e.key[:80], "ms": round(us / 1e3, 3), "calls": e.count})
    return sorted(rows, key=lambda r: -r["ms"])[:top]


def dense_fn(backend: SDPBackend):
    def attend(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)
    return attend


def bench_size(size: str, inputs: str, backends: tuple[str, ...], repeats: int, kernels: bool = False) -> list[dict]:
    """One row per backend at `size` ("tiny": the CPU story of TINY). kernels: each row also gets
    the per-kernel split of one forward incl. routing (kernel_split), and the gather and auto rows
    above 16k that of one forward + backward."""
    if size == "tiny":
        layout = moc_layout(TINY["shots"], TINY["frames_per_shot"], TINY["frame_tokens"])
        heads, head_dim, device, dtype, impl = TINY["heads"], TINY["head_dim"], "cpu", torch.float32, "reference"
        config = MoCConfig(top_k=2, tile=16)  # the interpreter's tiles (write_json records top_k=2 for "cpu")
    else:
        layout = moc_layout(frame_tokens=FRAME_TOKENS[size])
        heads, head_dim, device, dtype, impl = HEADS, HEAD_DIM, "cuda", torch.bfloat16, "triton"
        config = MoCConfig(top_k=TOP_K)
    make = structured_qkv if inputs == "structured" else random_qkv
    q, k, v = make(layout, heads, head_dim, device=device, dtype=dtype, seed=0)
    q, k, v = [t.requires_grad_() for t in (q, k, v)]
    do = torch.randn_like(q)
    N = layout.num_tokens

    def routing():
        return route(q.detach(), k.detach(), layout, config, impl=impl)

    sel = routing()
    stats = sel.stats()
    work = kernel_union = float("nan")
    if "moc-triton" in backends or "moc-auto" in backends:
        plan = kernel_plan(sel)
        work = float(plan.ranges.keys_per_tile().sum() * sel.tile / (heads * N * N))  # tile rows x keys walked
        kernel_union = float(plan.tiles.tile_count.float().mean())
    # what gather walks: the forced links at their pairs, each routed chunk's rows padded to BLOCK_M tiles
    walked_gather = gather_work(sel, GATHER_BLOCK["cuda" if q.is_cuda else "cpu"][0])

    def walked(backend: str, dispatch: str | None) -> float | None:
        """The walked work of the path that ran: the tile kernels' unions or gather's padded pairs."""
        path = (dispatch or "dense") if backend == "moc-auto" else backend
        if path in ("moc-triton", "triton"):
            return rounded(work, 4)
        if path.startswith(("moc-gather", "gather")):
            return rounded(walked_gather, 4)
        return None
    routing_ms = time_ms(routing, repeats)
    moc_attend = {
        "moc-triton": lambda s: triton_moc_attention(q, k, v, s),
        "moc-flex": lambda s: flex_moc_attention(q, k, v, s, block_mask=build_block_mask(s)),
        # forced="triton": the engine's GPU default with gradients; "sdpa" (the next row) its default to render
        "moc-gather": lambda s: gather_moc_attention(q, k, v, s, forced="triton"),
        "moc-gather-sdpa-forced": lambda s: gather_moc_attention(q, k, v, s, forced="sdpa"),
        # the same without per-pair buffers: each routed slot folded into the output in place (forward only)
        "moc-gather-in-place": lambda s: gather_moc_attention(q, k, v, s, forced="sdpa", merge="in_place"),
        "moc-gather-pieces": lambda s: in_pieces(gather_moc_attention, q, k, v, s, forced="sdpa", merge="buffers"),
    }
    # step 1 of "gather" alone: the forced links (no routing), (out, lse in log2 units) either way
    scale = head_dim ** -0.5
    groups, why = sdpa_forced_plan(q, sel)
    forced_steps = {
        "forced-triton": lambda: forced_attention(q, k, v, sel, scale, None)[:2],
        "forced-sdpa": lambda: sdpa_forced_attention(q, k, v, groups, scale),
    }
    forced_density = forced_only(sel).density()
    reference_out, forced_out = None, None
    rows = []
    for backend in backends:
        try:
            dispatch = dispatch_grad = None  # what "auto" ran without and with gradients
            if backend == "forced-sdpa" and groups is None:
                print(f"forced-sdpa skipped: the forced groups do not fit SDPA here ({why})", flush=True)
                continue
            if backend in forced_steps:
                step = forced_steps[backend]
                fwd = attn = lambda step=step: step()[0]  # noqa: E731
                density, union, routed_union = forced_density, float("nan"), float("nan")
            elif backend == "moc-gather-graph":
                graphed = GraphedAttention(layout, config, tuple(q.shape), tuple(k.shape), q.dtype, q.device)
                fwd = attn = lambda: graphed(q.detach(), k.detach(), v.detach())  # noqa: E731
                density, union, routed_union = sel.density(), stats.union_chunks_per_tile, stats.routed_chunks_per_tile
            elif backend == "moc-auto":
                # the model's entry point: dense SDPA when the cost model says it is faster, else MoC
                fwd = attn = lambda: model_attention(q, k, v, layout, config, backend="auto")[0]  # noqa: E731
                with torch.no_grad():
                    chosen = model_attention(q, k, v, layout, config, backend="auto")[1]
                dispatch = "dense" if chosen is None else str(chosen.info["backend"])
                if chosen is not None and chosen.info.get("graph"):  # replayed from a CUDA graph
                    dispatch += "-graph"
                chosen_grad = model_attention(q, k, v, layout, config, backend="auto")[1]  # q, k, v need grads
                dispatch_grad = "dense" if chosen_grad is None else str(chosen_grad.info["backend"])
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
            err, lse_err = float("nan"), float("nan")
            compared = ("moc-flex", "moc-gather", "moc-gather-sdpa-forced", "moc-gather-in-place", "moc-gather-pieces",
                        "moc-gather-graph")
            if backend in compared and reference_out is not None:
                err = float((out.float() - reference_out).norm() / reference_out.norm())
            if backend == "moc-triton":
                reference_out = out.float()
            if backend in forced_steps:
                with torch.no_grad():
                    o_f, lse_f = forced_steps[backend]()
                if forced_out is not None:  # forced-sdpa against forced-triton: out, and lse in log2 units
                    err = float((o_f.float() - forced_out[0]).norm() / forced_out[0].norm())
                    lse_err = float((lse_f - forced_out[1]).abs().max())
                forced_out = (o_f.float(), lse_f)
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
            split = split_bwd = None
            if kernels:
                with torch.no_grad():
                    split = kernel_split(fwd)
                print(f"{size} {inputs} {backend}, one forward by kernel: "
                      + "; ".join(f"{k['name'][:48]} {k['ms']:.2f} ms x{k['calls']}" for k in split[:6]), flush=True)
                if backward and backend.startswith(("moc-gather", "moc-auto")) and size != "16k":
                    split_bwd = kernel_split(fwd_bwd, top=14)
                    print(f"{size} {inputs} {backend}, one forward + backward by kernel: "
                          + "; ".join(f"{k['name'][:40]} {k['ms']:.2f} ms x{k['calls']}" for k in split_bwd[:10]),
                          flush=True)
            moc_flops, dense_flops = sel.attention_flops(head_dim)
            flops = dense_flops if backend.startswith("dense") or dispatch == "dense" else moc_flops
            if backend in forced_steps:
                flops = forced_only(sel).attention_flops(head_dim)[0]
            rows.append({
                "tokens": N, "size": size, "backend": backend, "inputs": inputs,
                "fwd_ms": round(fwd_ms, 3), "fwd_bwd_ms": round(fwd_bwd_ms, 3) if backward else None,
                "routing_ms": round(routing_ms, 3) if backend.startswith("moc") and dispatch != "dense" else 0.0,
                "attn_ms": round(attn_ms, 3), "attn_tflops": round(flops / attn_ms / 1e9, 1),
                "density": round(density, 4), "work": walked(backend, dispatch),
                "union_chunks_per_tile": rounded(union, 2), "routed_chunks_per_tile": rounded(routed_union, 2),
                "kernel_union_chunks_per_tile": rounded(kernel_union, 2) if backend == "moc-triton" else None,
                "peak_mem_gib": rounded(peak, 3), "fwd_peak_mem_gib": rounded(fwd_peak, 3),
                "rel_err_vs_triton": rounded(err, 5), "lse_err_vs_triton": rounded(lse_err, 5),
                "forced": sel.info.get("forced") if backend.startswith("moc-gather") else None,
                "dispatch": dispatch,
                "dispatch_grad": dispatch_grad,
                **({"kernels": split} if split is not None else {}),
                **({"kernels_fwd_bwd": split_bwd} if split_bwd is not None else {}),
            })
            print(format_row(rows[-1]), flush=True)
        except (RuntimeError, torch.OutOfMemoryError) as err:  # one failing backend (or graph capture)
            print(f"{size} {inputs} {backend} failed: {type(err).__name__}: {str(err)[:400]}", flush=True)
        finally:  # nothing of this row in the next rows' peak (the graph's static buffers and pool)
            out = fwd = attn = graphed = None  # noqa: F841
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return rows


def rounded(x: float, digits: int) -> float | None:
    """x rounded, or None for NaN (a figure this row does not have): JSON has no NaN."""
    return None if x != x else round(x, digits)


COLUMNS = [("tokens", 7), ("inputs", 10), ("backend", 24), ("fwd_ms", 9), ("fwd_bwd_ms", 10),
           ("routing_ms", 10), ("attn_ms", 9), ("attn_tflops", 11), ("density", 7), ("work", 6),
           ("union_chunks_per_tile", 6), ("peak_mem_gib", 8), ("dispatch", 8)]


def format_row(row: dict) -> str:
    return " ".join(str(row[c] if row[c] is not None else "-").rjust(w) for c, w in COLUMNS)


def summary(rows: list[dict]) -> list[str]:
    """The issue's targets, as ratios from this one run."""
    out = []
    by = {(r["size"], r["inputs"], r["backend"]): r for r in rows}
    for size in ("tiny", *FRAME_TOKENS):
        for inputs in ("structured", "random"):
            out += forced_summary(by, size, inputs)
            graph, cudnn = by.get((size, inputs, "moc-gather-graph")), by.get((size, inputs, "dense-cudnn"))
            if graph and cudnn:
                eager = by.get((size, inputs, "moc-gather-sdpa-forced"))
                out.append(f"{size} {inputs}: routing + gather forward from one CUDA graph {graph['fwd_ms']:.3f} ms, "
                           f"{cudnn['fwd_ms'] / graph['fwd_ms']:.2f}x vs cuDNN"
                           + (f" (eagerly {eager['fwd_ms']:.3f} ms)" if eager else ""))
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
                line += (f"; auto entry point: fwd {c['fwd_ms'] / a['fwd_ms']:.2f}x ({a['dispatch']}), "
                         f"fwd+bwd {c['fwd_bwd_ms'] / a['fwd_bwd_ms']:.2f}x ({a.get('dispatch_grad')}) vs cuDNN")
            out.append(line)
    return out


def forced_summary(by: dict, size: str, inputs: str) -> list[str]:
    """Step 1 of "gather" both ways, and the whole of "gather" both ways, where the rows exist."""
    out = []
    fs, ft, c = (by.get((size, inputs, b)) for b in ("forced-sdpa", "forced-triton", "dense-cudnn"))
    if fs and ft:
        line = (f"{size} {inputs}: forced links alone: sdpa {fs['attn_ms']} ms vs tile kernel {ft['attn_ms']} ms "
                f"({ft['attn_ms'] / fs['attn_ms']:.2f}x), density {fs['density']}")
        if c:
            line += (f"; dense cuDNN {c['attn_ms']} ms, so sdpa runs at {fs['attn_tflops']} TFLOP/s against "
                     f"dense's {c['attn_tflops']}")
        out.append(line)
    dense = by.get((size, inputs, "dense-cudnn"))
    for name in ("moc-gather", "moc-gather-sdpa-forced"):
        g = by.get((size, inputs, name))
        if g and dense:  # the ideal: cuDNN's dense rate over the attended pairs only
            ideal = g["density"] * dense["attn_ms"]
            out.append(f"{size} {inputs}: {name} attention {g['attn_ms']} ms against the ideal "
                       f"{ideal:.1f} ms (density {g['density']} x dense cuDNN): {g['attn_ms'] / ideal:.2f}x the ideal")
    gs, gt = by.get((size, inputs, "moc-gather-sdpa-forced")), by.get((size, inputs, "moc-gather"))
    if gs and gt:
        out.append(f"{size} {inputs}: gather attention with forced={gs['forced']} {gs['attn_ms']} ms vs "
                   f"forced={gt['forced']} {gt['attn_ms']} ms; fwd incl. routing {gs['fwd_ms']} vs {gt['fwd_ms']} ms; "
                   f"fwd+bwd {gs['fwd_bwd_ms']} vs {gt['fwd_bwd_ms']} ms")
    return out


def walked_work_rows(sizes: list[str], inputs: list[str]) -> list[dict]:
    """Gather's walked work (`gather_work`, the GPU's BLOCK_M) against the density of the same
    selection, routed where this runs (no kernel: the reference routing), for each size and input."""
    block_m = GATHER_BLOCK["cuda"][0]
    rows = []
    for size in sizes:
        layout = moc_layout(frame_tokens=FRAME_TOKENS[size])
        for kind in inputs:
            make = structured_qkv if kind == "structured" else random_qkv
            q, k, _ = make(layout, HEADS, HEAD_DIM, seed=0)
            sel = route(q, k, layout, MoCConfig(top_k=TOP_K))
            density, work = sel.density(), gather_work(sel, block_m)
            rows.append({"size": size, "inputs": kind, "density": round(density, 4), "gather_work": round(work, 4),
                         "work_over_density": round(work / density, 4)})
            print(f"{size} {kind}: density {density:.4f}; gather walks {work:.4f} with {block_m}-row tiles, "
                  f"{work / density:.3f}x the density", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: the tiny story only, to check that the script runs (Triton rows need "
                             "TRITON_INTERPRET=1)")
    parser.add_argument("--sizes", nargs="+", default=list(FRAME_TOKENS), choices=list(FRAME_TOKENS))
    parser.add_argument("--inputs", nargs="+", default=["structured", "random"], choices=["structured", "random"])
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per figure (median)")
    parser.add_argument("--json", type=Path, help="write the rows and the run's metadata here")
    parser.add_argument("--kernels", action="store_true",
                        help="also split one forward (routing incl.) of every row by kernel (torch.profiler): "
                             "each row's 'kernels', the top 10 by device time")
    parser.add_argument("--gather-block", default=None, metavar="M,N,WARPS",
                        help="the gather kernels' query rows, key columns and warps a program on the GPU "
                             f"(default {','.join(map(str, GATHER_BLOCK['cuda']))}; recorded in the JSON)")
    parser.add_argument("--render-merge", default=None, choices=triton_gather.GATHER_MERGES,
                        help="how gather's forward without gradients merges the routed slots, for every row that "
                             "leaves it to the engine (moc-auto, moc-gather*): 'buffers' (per-pair partial outputs, "
                             "then one merge) or 'in_place' (folded into the output slot by slot); default: the "
                             f"engine's ({triton_gather.GATHER_RENDER_MERGE}); recorded in the JSON")
    parser.add_argument("--auto-graphs", action="store_true",
                        help="let moc-auto without gradients replay a captured CUDA graph at 12k-32k keys "
                             "(engine.moc.attention.AUTO_GRAPHS, off by default); recorded in the JSON")
    parser.add_argument("--work-only", action="store_true",
                        help="no timing: route the inputs at --sizes here (the CPU will do, about 40 s for all "
                             "three) and print gather's walked work against the density for its GPU tiles")
    args = parser.parse_args()
    if args.work_only:
        rows = walked_work_rows(args.sizes, args.inputs)
        if args.json:
            args.json.write_text(json.dumps({"gather_block": list(GATHER_BLOCK["cuda"]), "rows": rows}, indent=2) + "\n")
        return
    if args.auto_graphs:
        moc_attention_module.AUTO_GRAPHS = True
    if args.render_merge:
        triton_gather.GATHER_RENDER_MERGE = args.render_merge
    if args.gather_block:
        try:
            m, n, warps = (int(x) for x in args.gather_block.split(","))
        except ValueError:
            parser.error(f"--gather-block takes three integers M,N,WARPS, e.g. 128,64,8; got {args.gather_block!r}")
        if min(m, n) < 16 or m & (m - 1) or n & (n - 1) or warps not in (1, 2, 4, 8, 16):
            parser.error("--gather-block: M and N powers of two, at least 16; WARPS one of 1, 2, 4, 8, 16")
        GATHER_BLOCK["cuda"] = (m, n, warps)
    if args.device == "cpu":
        args.sizes = ["tiny"]
        runnable = CPU_BACKENDS + (CPU_INTERPRETED if os.environ.get("TRITON_INTERPRET") == "1" else ())
        args.backends = [b for b in args.backends if b in runnable]
        args.repeats = min(args.repeats, 2)
    elif not torch.cuda.is_available():
        raise SystemExit("benchmarks/attention.py needs a CUDA GPU (or --device cpu for a tiny check)")
    # flex_attention recompiles for every size and BlockMask shape; the default limit of 8 would
    # drop it to its unfused eager path (a full score matrix) halfway through the table
    torch._dynamo.config.recompile_limit = 64
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(" ".join(c.rjust(w) for c, w in COLUMNS))
    rows = []
    interpreted = args.device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    with interpreter_numpy_shim() if interpreted else contextlib.nullcontext():
        run_sizes(args, rows, device, date)
    print("\n".join(summary(rows)))


def run_sizes(args, rows: list[dict], device: str, date: str) -> None:
    for size in args.sizes:
        for inputs in args.inputs:
            repeats = max(3, args.repeats // 2) if size == "180k" else args.repeats
            repeats = args.repeats if size == "tiny" else repeats
            for row in bench_size(size, inputs, tuple(args.backends), repeats, kernels=args.kernels):
                rows.append({**row, "device": device, "date": date})
            if args.json:  # after every size, so that a cut-off run still leaves its rows
                write_json(args.json, rows, device, date)


def write_json(path: Path, rows: list[dict], device: str, date: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tiny = device == "cpu"
    meta = {"device": device, "date": date, "torch": torch.__version__, "triton": __import__("triton").__version__,
            "heads": TINY["heads"] if tiny else HEADS, "head_dim": TINY["head_dim"] if tiny else HEAD_DIM,
            "top_k": 2 if tiny else TOP_K, "dtype": "float32" if tiny else "bfloat16",
            "gather_block": list(GATHER_BLOCK["cpu" if tiny else "cuda"]),
            "render_merge": triton_gather.GATHER_RENDER_MERGE,
            "auto_graphs": moc_attention_module.AUTO_GRAPHS,
            "workload": "8 shots x 15 frames x frame_tokens (136 / 544 / 1500), chunk = frame, shot anchor, causal "
                        "across shots; structured inputs per benchmarks/workload.py, random = i.i.d. normal",
            "summary": summary(rows), "rows": rows}
    path.write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()
