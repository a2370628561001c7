"""Where MoC attention's forward memory goes at full size, traced on the CPU (no GPU needed).

Runs the host code of one attention forward at the sizes of `benchmarks/attention.py` (8 shots x
15 frames x F tokens, 12 heads x 128, bf16, batch 1, k = 5) on CPU tensors, with every Triton
launch and every SDPA call replaced by a stand-in that computes nothing: a Triton kernel writes
into tensors allocated before its launch, and an SDPA stand-in allocates exactly the outputs the
real call returns. The fused path's sizes never depend on the routing's values (it reads nothing
back to the host), so the allocations are those the GPU sees; the values are not computed.

A dispatch mode counts the bytes of every storage the forward allocates, live after each op, and
names the tensors live at the peak. Not counted: a kernel's own workspace (cuDNN's; the GPU's
radix sort's), the caching allocator's rounding (512-byte blocks), and the inputs q, k, v (and
the output gradient of the "+bwd" ways, allocated before the call). Compare `peak_gib` between
rows; `above_dense_gib` is what issue 10's "peak memory no higher than dense" is about. The H100's
measured forward peaks (BENCHMARKS.md, 2026-12-07) check the model: at MoC-180k gather with
buffers peaked 0.28 GiB above dense cuDNN (traced: 0.35), in place over all heads 0.54 (traced
0.33 before this file's changes: the GPU sort's double buffers of all heads' pairs are not
traced), at 16k 0.25 and 0.05 (traced 0.25 and 0.03). With gradients the trace overstates MoC's
excess: dense cuDNN's backward keeps a float32 dQ accumulator of its own, which is not traced.

    python benchmarks/attention_memory.py --json benchmarks/results/attention_memory_cpu.json
    python benchmarks/attention_memory.py --sizes 16k --top 12
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from triton.runtime import KernelInterface

from benchmarks.attention import (
    FRAME_TOKENS,
    HEAD_DIM,
    HEADS,
    PIECE_BYTES,
    TOP_K,
    in_pieces,
)
from benchmarks.workload import moc_layout
from engine.moc import (
    MoCConfig,
    triton_attention,
    triton_gather,
    triton_routing,
)
from engine.moc.attention import dense_attention

GIB = 2 ** 30
# SDPA calls whose outputs the stand-in allocates: the forward's (out (B, H, L, D) in q's dtype, lse
# (B, H, L) float32) and the backward's (dq, dk, dv) shaped as its q, k, v (arguments 1-3)
SDPA_FORWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
SDPA_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
# gather-pieces: the buffered merge with a head's queries in pieces (benchmarks/attention.py's
# moc-gather-pieces row: GATHER_FWD_PIECE_BYTES at its PIECE_BYTES); "+bwd": forward and backward
# (torch.autograd.grad with a given output gradient), as benchmarks/attention.py's fwd_bwd peak
WAYS = ("dense", "gather-buffers", "gather-pieces", "gather-in-place")
GRAD_WAYS = ("dense+bwd", "gather+bwd")


class AllocationTrace(TorchDispatchMode):
    """Live bytes of the storages allocated under it, checked after every op; the peak, and what
    was live then (the op that made each storage, its shape and dtype)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int, str]] = {}
        self.peak = 0
        self.at_peak: list[tuple[int, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is SDPA_FORWARD:
            q = args[0]
            out = (torch.empty_like(q), torch.empty(q.shape[:-1], dtype=torch.float32))
        elif func is SDPA_BACKWARD:
            out = tuple(torch.empty_like(x) for x in args[1:4])
        else:
            out = func(*args, **kwargs)
        for key in [key for key, (ref, _, _) in self.live.items() if ref.expired()]:
            del self.live[key]  # freed since the last op (before a new storage can reuse its address)
        inputs = {StorageWeakRef(t.untyped_storage()).cdata
                  for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            ref = StorageWeakRef(t.untyped_storage())
            if ref.cdata not in inputs and ref.cdata not in self.live:  # a new storage, not a view
                name = str(func.overloadpacket.__name__)
                self.live[ref.cdata] = (ref, t.untyped_storage().nbytes(),
                                        f"{name} {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}")
        total = sum(nbytes for _, nbytes, _ in self.live.values())
        if total > self.peak:
            self.peak = total
            self.at_peak = sorted(((nbytes, what) for _, nbytes, what in self.live.values()), reverse=True)
        return out


class _NoLaunch:
    """A Triton kernel that launches nothing: `kernel[grid](...)` returns None."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def stubbed_kernels():
    """Every Triton kernel of the fused modules replaced by _NoLaunch (and the fused routing
    allowed on CPU tensors, as under the interpreter) while inside; yields the kernels' names.
    Everything is put back on leaving."""
    saved = [(module, name, obj) for module in (triton_attention, triton_gather, triton_routing)
             for name, obj in vars(module).items() if isinstance(obj, KernelInterface)]
    env = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        for module, name, _ in saved:
            setattr(module, name, _NoLaunch())
        yield [f"{module.__name__.rsplit('.', 1)[-1]}.{name}" for module, name, _ in saved]
    finally:
        for module, name, obj in saved:
            setattr(module, name, obj)
        if env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = env


def forward(way: str, q, k, v, layout, config: MoCConfig):
    """One forward the way `way` runs it (routing included for MoC); "+bwd" ways with gradients."""
    if way == "dense+bwd":
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    if way == "gather+bwd":
        selection = triton_routing.route_triton(q.detach(), k.detach(), layout, config)
        return triton_gather.gather_moc_attention(q, k, v, selection, forced="sdpa")
    if way == "dense":
        return dense_attention(q, k, v)
    selection = triton_routing.route_triton(q, k, layout, config)
    if way == "gather-pieces":
        return in_pieces(triton_gather.gather_moc_attention, q, k, v, selection, forced="sdpa", merge="buffers")
    merge = "in_place" if way == "gather-in-place" else "buffers"
    return triton_gather.gather_moc_attention(q, k, v, selection, forced="sdpa", merge=merge)


def trace(size: str, way: str, top: int = 8) -> dict:
    """One row: the peak of `way`'s forward at `size` (call it inside `stubbed_kernels`)."""
    layout = moc_layout(frame_tokens=FRAME_TOKENS[size])
    N = layout.num_tokens
    grad = way in GRAD_WAYS
    q, k, v = (torch.empty(1, HEADS, N, HEAD_DIM, dtype=torch.bfloat16, requires_grad=grad) for _ in range(3))
    do = torch.empty(1, HEADS, N, HEAD_DIM, dtype=torch.bfloat16) if grad else None
    config = MoCConfig(top_k=TOP_K)
    t0 = time.perf_counter()
    with torch.set_grad_enabled(grad), AllocationTrace() as traced:
        out = forward(way, q, k, v, layout, config)
        if grad:
            grads = torch.autograd.grad(out, (q, k, v), do)
    seconds = time.perf_counter() - t0
    if grad:
        del grads
    return {"size": size, "tokens": N, "way": way,
            "peak_gib": traced.peak / GIB, "output_gib": out.untyped_storage().nbytes() / GIB,
            "live_at_peak": [{"mib": round(nbytes / 2 ** 20, 2), "tensor": what} for nbytes, what in traced.at_peak[:top]],
            "trace_s": round(seconds, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["16k", "64k", "180k"], choices=list(FRAME_TOKENS))
    p.add_argument("--ways", nargs="+", default=list(WAYS + GRAD_WAYS), choices=WAYS + GRAD_WAYS)
    p.add_argument("--top", type=int, default=8, help="tensors listed per row, largest first")
    p.add_argument("--piece-mib", type=float,
                   help="triton_gather.GATHER_FWD_PIECE_BYTES for this run, in MiB (the buffered merge's "
                        "per-piece budget without gradients; default: the engine's)")
    p.add_argument("--json", type=Path, help="write the rows here")
    args = p.parse_args(argv)
    if args.piece_mib is not None:
        triton_gather.GATHER_FWD_PIECE_BYTES = int(args.piece_mib * 2 ** 20)
    rows = []
    print(f"{'size':>5} {'way':<24} {'peak GiB':>9} {'above dense':>12}  largest live at the peak")
    with stubbed_kernels() as stubbed:
        for size in args.sizes:
            dense = None
            for way in args.ways:
                row = trace(size, way, args.top)
                if way in ("dense", "dense+bwd"):  # the rows after it compare with it
                    dense = row["peak_gib"]
                row["above_dense_gib"] = None if dense is None else row["peak_gib"] - dense
                rows.append(row)
                above = "" if dense is None else f"{row['above_dense_gib']:+.3f}"
                largest = "; ".join(f"{t['tensor']} {t['mib']:.0f} MiB" for t in row["live_at_peak"][:3])
                print(f"{size:>5} {way:<24} {row['peak_gib']:9.3f} {above:>12}  {largest}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "what": "peak bytes allocated by one attention forward without gradients (the '+bwd' ways: forward and "
                    "backward, the gradients included), inputs excluded, traced on the CPU with every Triton launch "
                    "and SDPA call stubbed (outputs allocated, nothing computed); kernels' own workspaces (cuDNN's, "
                    "its backward's float32 dQ accumulator) are not counted",
            "command": "python benchmarks/attention_memory.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "torch": torch.__version__, "heads": HEADS, "head_dim": HEAD_DIM, "top_k": TOP_K,
            "gather_fwd_buffer_bytes": triton_gather.GATHER_FWD_BUFFER_BYTES,
            "gather_fwd_piece_bytes": triton_gather.GATHER_FWD_PIECE_BYTES, "pieces_row_piece_bytes": PIECE_BYTES,
            "gather_in_place_buffer_bytes": triton_gather.GATHER_IN_PLACE_BUFFER_BYTES, "stubbed_kernels": stubbed,
            "rows": rows}, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
