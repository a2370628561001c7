"""MoC attention: one entry point, several backends that consume the same Selection.

For: `moc_attention(q, k, v, selection, backend=...)`, the readable float32 reference (the
specification every fast path is tested against), and dispatch by name.
Not for: routing (routing.py) or backend internals (flex.py, triton_attention.py).

Backends:
  "reference": masked softmax attention in float32, query tile by query tile; CPU and GPU; autograd.
  "flex":      FlexAttention with a BlockMask built from the selection (flex.py).
  "triton":    fused block-sparse flash attention over the selection, per query tile's union of
               chunks (GPU only).
  "gather":    the routed pairs per key chunk, merged with the forced part by log-sum-exp
               (triton_gather.py): work that follows the density whatever the routing (GPU only);
               its forced part one cuDNN call per forced group (forced.py, forced="sdpa") where that
               fits, or through the tile kernel (forced="triton"), its backward the same way;
               by default "sdpa" (triton_gather.FORCED_DEFAULT; selection.info["forced"]).
  "dense":     the selection as a boolean mask through SDPA (exact; for debugging and as a floor).
  "chunked":   forced blocks dense plus routed chunks gathered, merged by log-sum-exp (chunked.py):
               exact, its work follows the density; the CPU path at story sizes.
  "auto":      on CUDA, "sdpa" when the selection covers every (query, key) pair (plain dense
               SDPA is then exact, and cuDNN is faster than any sparse kernel at density 1), else
               "triton" when it is importable, or "gather" on a story of GATHER_MIN_KEYS keys or
               more (`sparse_choice`: always when rendering, GATHER_MIN_WALK_RENDER; with gradients
               when the tile unions would walk GATHER_MIN_WALK times the attended pairs or more,
               which at 1.0 is always, with no probe); on the CPU "chunked", or "dense" (exact, SDPA with
               the mask) below CHUNKED_MIN_PAIRS (query, key) pairs, where its per-chunk steps cost
               more than they save. The choice and its reason are recorded in
               selection.info["backend"] / ["dispatch"] and in the statistics.
An unavailable backend raises; nothing is swapped silently.

Before routing, `dense_is_faster` tells a caller with backend="auto" whether plain dense SDPA
would beat routing + the fused kernel at this size (short sequences, where the paper also found
MoC slower end to end). The model's attention call site uses it so that "auto" is never slower
than dense; that call computes dense attention (a superset of every selection) and the routing
report records it. An explicit backend name always runs MoC.
"""

from __future__ import annotations

import collections
import os
import warnings

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import record_function

from .layout import TokenLayout
from .routing import MoCConfig, expected_density, route
from .selection import Selection

BACKENDS = ("auto", "reference", "flex", "triton", "dense", "chunked", "gather")
DISPATCH_REASONS = {  # why "auto" picked a backend, as recorded in selection.info["dispatch"]
    "sdpa": "auto: the selection is fully dense, so unmasked SDPA (cuDNN/flash) computes it exactly and faster",
    "triton": "auto: sparse selection on CUDA, fused Triton kernel",
    "gather": "auto: sparse selection on CUDA over a long story (GATHER_MIN_KEYS keys or more; with gradients "
              "and GATHER_MIN_WALK above 1.0, only query tiles that route apart), fused kernels per key chunk",
    "reference": "auto: not on a CUDA GPU (or Triton unavailable), float32 reference",
    "dense": "auto: on the CPU, a small selection as an exact mask through SDPA",
    "chunked": "auto: on the CPU, forced blocks dense and routed chunks gathered (work follows the density)",
    "reference-shape": "auto: head dim or dtype outside the Triton kernel's (64/128; bf16/fp16/fp32), float32 reference",
}
TRITON_HEAD_DIMS = (64, 128)  # what triton_attention supports; "auto" sends anything else to the reference
TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selection: Selection) -> None:
    B, H, Nq = selection.shape
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, N, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if tuple(q.shape[:3]) != (B, H, Nq):
        raise ValueError(f"q must be (B={B}, H={H}, Nq={Nq}, D) to match the selection, got {tuple(q.shape)}")
    if tuple(k.shape[:3]) != (B, H, selection.num_keys) or k.shape != v.shape:
        raise ValueError(f"k and v must both be (B={B}, H={H}, N={selection.num_keys}, D={q.shape[3]}); "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"q and k must share the head dim, got {q.shape[3]} and {k.shape[3]}")


def reference_attention(q, k, v, selection: Selection, scale: float | None = None,
                        block: int = 1024) -> torch.Tensor:
    """The specification: softmax(q k^T * scale, masked to the selection) v, in float32.
    Works in query blocks so the (Nq, N) score matrix never exists whole."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    token_chunk = selection.layout.tensors_on(q.device).token_chunk  # (N,)
    mask = selection.token_mask()  # (B, H, Nq, C)
    out = []
    for t0 in range(0, q.shape[2], block):
        t1 = min(t0 + block, q.shape[2])
        allowed = mask[:, :, t0:t1][..., token_chunk]  # (B, H, T, N)
        s = torch.einsum("bhtd,bhnd->bhtn", q[:, :, t0:t1].float(), k.float()) * scale
        p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
        out.append(torch.einsum("bhtn,bhnd->bhtd", p, v.float()))
    return torch.cat(out, dim=2).to(q.dtype)


def dense_masked_attention(q, k, v, selection: Selection, scale: float | None = None,
                           block: int = 256) -> torch.Tensor:
    """The selection as explicit boolean masks through SDPA, a block of queries at a time, each
    over only the key chunks some query of the block attends (the union: causal stories skip
    every later shot, coherent routing much more); a block whose union is attended by every one
    of its queries runs unmasked (SDPA's fast path). Exact; memory O(block * N)."""
    token_chunk = selection.layout.tensors_on(q.device).token_chunk  # (N,)
    mask = selection.token_mask()  # (B, H, Nq, C)
    Nq = q.shape[2]
    out = torch.empty_like(q)
    for t0 in range(0, Nq, block):
        t1 = min(t0 + block, Nq)
        m = mask[:, :, t0:t1]  # (B, H, T, C)
        used = m.flatten(0, 2).any(0)  # (C,) chunks some query of the block attends
        keys = used[token_chunk].nonzero().squeeze(1)  # their tokens, in order
        if keys.numel() == k.shape[2]:
            kk, vv, m = k, v, m[..., token_chunk]
        else:
            kk, vv, m = k[:, :, keys], v[:, :, keys], m[..., token_chunk[keys]]
        attn_mask = None if bool(m.all()) else m
        out[:, :, t0:t1] = torch.nn.functional.scaled_dot_product_attention(q[:, :, t0:t1], kk, vv,
                                                                            attn_mask=attn_mask, scale=scale)
    return out


# profiler range names (benchmarks/e2e.py splits a forward's device time by them)
ROUTING_RANGE = "moc.routing"  # descriptors, scores, top-k, the selection
ATTENTION_RANGE = "storyboard.attention"  # a self-attention call, routing included (engine/processors.py)

# SDPA's own order tries FlashAttention-2 before cuDNN; on the H100 cuDNN is ~1.6x faster
# (MOC.md §4, benchmarks/results/attention_h100.json), so dense calls ask for it first.
DENSE_PRIORITY = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                  SDPBackend.MATH]


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Unmasked SDPA, cuDNN first on CUDA: the dense path of the model and of "auto"."""
    if not q.is_cuda:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    with sdpa_kernel(DENSE_PRIORITY, set_priority=True):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)


def triton_available() -> tuple[bool, str]:
    """(available, reason) for the fused Triton backend."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":  # the interpreter: tests
        return False, "the Triton backend needs a CUDA GPU and none is visible"
    try:
        from . import triton_attention  # noqa: F401
    except ImportError as err:
        return False, f"the Triton backend could not be imported: {err}"
    return True, ""


# Forward cost model of routing + MoC attention: a fixed routing/plan/launch cost that grows with
# the key count, plus the kernels' work (WORK_FACTOR x the density of the dense time). Dense time
# is counted at cuDNN's measured rate. Two fits, for what `auto` runs at the size:
# - the tile kernels (below GATHER_MIN_KEYS keys), fitted to benchmarks/results/attention_h100.json
#   (H100, bf16, structured inputs);
# - "gather" (from GATHER_MIN_KEYS keys on), fitted to its forward incl. routing with step 1 on
#   cuDNN, 2.03 / 11.15 / 69.8 ms at 16k / 64k / 180k (H100, bf16, structured inputs, one run:
#   benchmarks/results/attention_small_sdpa_bwd_h100.json, attention_180k_sdpa_bwd_h100.json), so
#   that at 16k `auto` runs MoC (2.03 ms against cuDNN's 2.8) and dense only below about 13k keys.
DENSE_TFLOPS = 580.0  # cuDNN SDPA forward on the H100, TFLOP/s
MOC_FIXED_MS = 3.0  # tile kernels: routing + plan + launches at a few thousand tokens, ms
MOC_FIXED_MS_PER_KTOKEN = 0.07  # their growth with the key count, ms per 1,000 keys
MOC_WORK_FACTOR = 1.41  # MoC kernel time / (density x dense time)
GATHER_FIXED_MS = 1.1  # gather: routing + pair lists + launches, ms
GATHER_FIXED_MS_PER_KTOKEN = 0.024
GATHER_WORK_FACTOR = 1.16
# CPU "auto": "chunked" from this many (query, key) pairs B*H*Nq*N on; below it "dense". On the
# 2-core CPU, the default story's self-attention (2 x 4 x 3072 x 3072, density 0.37): chunked
# 149 ms, masked SDPA 388 ms, unmasked dense SDPA 198 ms
CHUNKED_MIN_PAIRS = 1 << 20
# CUDA "auto": "gather" instead of the tile-union kernels when these kernels would walk at least
# GATHER_MIN_WALK x the attended pairs, on stories of GATHER_MIN_KEYS keys or more. Measured on one
# H200 at MoC-180k (bf16, benchmarks/results/attention_gather_180k_h200.json): the tile kernel's
# attention takes about 72 ms per unit of walk ratio (85 ms at 1.18 on structured inputs, 240 ms at
# 3.15 on random ones), "gather" about 92 ms at either, so they cross near 1.27. Below ~32k keys
# the per-chunk programs hold few rows: "gather" lost the training step at 6k-token stories
# (benchmarks/results/train_step_h200.json). At 16k keys it wins both ways since its forced part and
# that part's backward run on cuDNN (H100, one run, attention_small_sdpa_bwd_h100.json: forward
# incl. routing 2.03 ms, forward + backward 6.2 ms; the tile kernels took 4.4 and 11.8 on the H200,
# attention_sizes_topk_h200.json), so it starts at 12,288 keys: above the training stories'.
# Rendering (no gradients) takes "gather" from GATHER_MIN_KEYS keys on whatever the walk ratio, with
# no probe and so no host synchronisation: since its merge became one kernel and its forced part
# runs through cuDNN (2026-11-29, benchmarks/results/attention_merge_180k_h200.json), gather's
# attention takes 69 ms at MoC-180k on either input, below the tile kernels' 72 ms at the lowest
# walk ratio there is (1.0; 85 ms at structured inputs' 1.18). With gradients too since its
# backward adds the routed share straight into the gradients (no per-pair buffers; one H200, one
# run, benchmarks/results/attention_180k_lean_h200.json): forward + backward on structured inputs,
# gather 376.1 ms against `auto` with the walk probe then choosing the tile kernels 387.3 (the
# tile kernels alone: 383-385 ms in the two runs before); on random ones 375.5 against 379.8 (the
# probe alone costs 8-10 ms: the tile plan for the whole selection and a host synchronisation).
# So with gradients too it is gather at once; the probe stays for a threshold above 1.0.
GATHER_MIN_WALK = 1.0
GATHER_MIN_WALK_RENDER = 1.0  # at or below 1.0: always gather, without measuring the walk
GATHER_MIN_KEYS = 12_288


def dense_is_faster(batch: int, heads: int, num_queries: int, num_keys: int, head_dim: int,
                    density: float, device: torch.device) -> bool:
    """Whether unmasked dense SDPA is estimated faster than MoC (routing included) on `device`.
    `density` is the expected density (routing.expected_density: known before routing)."""
    if device.type != "cuda":
        return False  # the CPU paths are exact and never swapped for dense attention
    dense_ms = 4.0 * batch * heads * num_queries * num_keys * head_dim / (DENSE_TFLOPS * 1e9)
    if num_keys >= GATHER_MIN_KEYS:  # what sparse_choice runs there
        fixed, per_ktoken, work = GATHER_FIXED_MS, GATHER_FIXED_MS_PER_KTOKEN, GATHER_WORK_FACTOR
    else:
        fixed, per_ktoken, work = MOC_FIXED_MS, MOC_FIXED_MS_PER_KTOKEN, MOC_WORK_FACTOR
    moc_ms = fixed + per_ktoken * num_keys / 1e3 + work * density * dense_ms
    return dense_ms <= moc_ms


def is_fully_dense(selection: Selection) -> bool:
    """Every query attends every key: each tile's union holds all chunks, each one full. Where the
    host knows the forced links and some query chunk cannot reach every chunk (its forced row plus
    R routed slots fall short of C), no: the tile unions are then neither built nor read back."""
    C = selection.layout.num_chunks
    forced = selection.forced_host
    if forced is not None:
        _, _, Nq = selection.shape
        token_chunk = selection.layout.tensors.token_chunk
        first, last = int(token_chunk[selection.q_offset]), int(token_chunk[selection.q_offset + Nq - 1])
        if int(forced[first:last + 1].sum(1).min()) + selection.routed.shape[-1] < C:
            return False
    return bool(((selection.tile_count == C) & selection.tile_full.all(-1)).all())


def resolve_backend(backend: str, device: torch.device, selection: Selection | None = None) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" and selection is not None and is_fully_dense(selection):
            return "sdpa"
        if device.type != "cuda":
            B, H, Nq = selection.shape if selection is not None else (0, 0, 0)
            n_keys = selection.num_keys if selection is not None else 0
            return "chunked" if B * H * Nq * n_keys >= CHUNKED_MIN_PAIRS else "dense"
        ok, _ = triton_available()
        return "triton" if ok else "reference"
    if backend in ("triton", "gather"):
        ok, why = triton_available()
        if not ok:
            raise ValueError(f"backend={backend!r} is unavailable: {why}; use backend='reference' or 'flex'")
    return backend


def moc_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selection: Selection, *,
                  backend: str = "auto", scale: float | None = None) -> torch.Tensor:
    """Attention of q (B, H, Nq, D) over k, v (B, H, N, D) restricted to `selection`.
    Returns (B, H, Nq, D) in q's dtype."""
    check_qkv(q, k, v, selection)
    name = resolve_backend(backend, q.device, selection)
    reason = name
    plan = None
    if backend == "auto" and name == "triton":
        if q.shape[-1] not in TRITON_HEAD_DIMS or q.dtype not in TRITON_DTYPES:
            name, reason = "reference", "reference-shape"
        else:
            grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
            name, plan = sparse_choice(selection, grad)
            reason = name
    selection.info["backend"] = name
    selection.info["dispatch"] = DISPATCH_REASONS[reason] if backend == "auto" else "requested"
    if name == "sdpa":
        return dense_attention(q, k, v, scale)
    if name == "reference":
        return reference_attention(q, k, v, selection, scale)
    if name == "dense":
        return dense_masked_attention(q, k, v, selection, scale)
    if name == "chunked":
        from .chunked import chunked_moc_attention
        return chunked_moc_attention(q, k, v, selection, scale)
    if name == "flex":
        from .flex import flex_moc_attention
        return flex_moc_attention(q, k, v, selection, scale)
    if name == "gather":
        from .triton_gather import gather_moc_attention
        return gather_moc_attention(q, k, v, selection, scale)
    from .triton_attention import triton_moc_attention
    return triton_moc_attention(q, k, v, selection, scale, plan=plan)


def sparse_choice(selection: Selection, grad: bool = True):
    """("triton", its kernel plan or None) or ("gather", None) for a sparse selection on the GPU:
    "gather" when the tile unions would walk GATHER_MIN_WALK x the attended pairs or more
    (GATHER_MIN_WALK_RENDER without gradients) on a story of GATHER_MIN_KEYS keys or more. The walk
    ratio (one host synchronisation) is recorded in selection.info["walk_ratio"]; the plan it was
    measured on is reused by the tile kernels. A threshold of 1.0 or less needs no measuring (the
    walk is never below the attended pairs): "gather" at once, with no walk ratio recorded."""
    if selection.num_keys < GATHER_MIN_KEYS or selection.tile < 16:  # gather takes tiles of 16 rows up
        return "triton", None
    threshold = GATHER_MIN_WALK if grad else GATHER_MIN_WALK_RENDER
    if threshold <= 1.0:
        return "gather", None
    from .triton_attention import kernel_plan, walk_ratio
    plan = kernel_plan(selection)
    ratio = walk_ratio(selection, plan)
    selection.info["walk_ratio"] = round(ratio, 3)
    return ("gather", None) if ratio >= threshold else ("triton", plan)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, config: MoCConfig, *,
           backend: str = "auto", q_offset: int = 0, training: bool = False,
           generator: torch.Generator | None = None, q_route: torch.Tensor | None = None,
           k_route: torch.Tensor | None = None, scale: float | None = None,
           graph: bool = True) -> tuple[torch.Tensor, Selection | None]:
    """Routing + attention, the way the model runs self-attention: q (B, H, Nq, D) are layout
    tokens [q_offset, q_offset + Nq), k and v (B, H, N, D) the whole layout. q_route/k_route, when
    given, are what routing scores instead of q/k (pre-RoPE routing). With backend="auto" on a GPU,
    unmasked dense SDPA runs instead when `dense_is_faster` at this size (never with blocked shots,
    which dense attention would see); the selection is then None. With AUTO_GRAPHS, backend="auto"
    on a GPU without gradients at GATHER_MIN_KEYS to GRAPH_MAX_KEYS keys (and graph=True) replays
    routing and attention from a CUDA graph captured for these shapes (`graphed_attend`): the same
    kernels without their launch and host work; selection.info["graph"] says so.
    Returns (out (B, H, Nq, D), selection)."""
    B, H, Nq, D = q.shape
    if (backend == "auto" and not config.blocks
            and dense_is_faster(B, H, Nq, k.shape[2], D, expected_density(layout, config), q.device)):
        return dense_attention(q, k, v, scale), None
    if (backend == "auto" and graph and AUTO_GRAPHS and q.is_cuda and not training and not torch.is_grad_enabled()
            and GATHER_MIN_KEYS <= k.shape[2] <= GRAPH_MAX_KEYS and not torch.cuda.is_current_stream_capturing()):
        replayed = graphed_attend(q, k, v, layout, config, q_offset, q_route, k_route, scale)
        if replayed is not None:
            return replayed
    with record_function(ROUTING_RANGE):
        selection = route(q if q_route is None else q_route, k if k_route is None else k_route, layout, config,
                          q_offset=q_offset, training=training, generator=generator)
    return moc_attention(q, k, v, selection, backend=backend, scale=scale), selection


# "auto" without gradients replays routing + attention from a CUDA graph on stories of
# GATHER_MIN_KEYS to GRAPH_MAX_KEYS keys: there the kernels take about as long as launching them
# and the host work around them (at 16k on the H100, gather's kernels sum to about 1.5 ms of a
# 2-3 ms call, and its graph replay took 1.78 ms: benchmarks/results/attention_small_*_h100.json),
# and a render calls every layer with the same shapes. Larger stories keep the GPU busy for longer
# than the host needs to queue the next call, so nothing is gained there.
GRAPH_MAX_KEYS = 32_768
# Off until its GPU test (tests/engine/moc/test_triton.py, "replays_a_captured_graph") and the 16k
# benchmark (benchmarks/attention.py --auto-graphs) have run on the H100: written 2026-12-07 when no
# GPU could be had; the CPU tests cover its fallback only.
AUTO_GRAPHS = False
GRAPH_CACHE_SIZE = 4  # captured graphs kept (least recently used dropped): one per layout and shape
_graphs: "collections.OrderedDict[tuple, object]" = collections.OrderedDict()


def graphed_attend(q, k, v, layout: TokenLayout, config: MoCConfig, q_offset: int, q_route=None, k_route=None,
                   scale: float | None = None) -> tuple[torch.Tensor, Selection] | None:
    """`attend(..., backend="auto")` replayed from a CUDA graph captured on first use for these
    shapes, layout and config (GraphedAttention: the inputs copied into its static buffers). The
    output is a fresh tensor; the selection is the graph's, valid until the next replay of the same
    graph (read it in stream order, as the routing recorder does). None where capturing failed
    (once per key; a warning says why): the caller then runs eagerly."""
    from .graphed import GraphedAttention
    routes = None if q_route is None else (tuple(q_route.shape), tuple(k_route.shape))
    key = (layout, config, tuple(q.shape), tuple(k.shape), routes, q.dtype, str(q.device), q_offset, scale)
    if key not in _graphs:
        inputs = (q, k, v) + (() if q_route is None else (q_route, k_route))
        try:
            _graphs[key] = GraphedAttention(layout, config, tuple(q.shape), tuple(k.shape), q.dtype, q.device,
                                            backend="auto", q_offset=q_offset, route_shapes=routes, scale=scale,
                                            inputs=inputs, warmup=1)
        except Exception as err:  # noqa: BLE001 - any capture failure: run eagerly from now on
            warnings.warn(f"MoC attention could not be captured in a CUDA graph ({type(err).__name__}: {err}); "
                          "it runs without one at this shape", stacklevel=3)
            _graphs[key] = None
        while len(_graphs) > GRAPH_CACHE_SIZE:
            _graphs.popitem(last=False)
    _graphs.move_to_end(key)
    graphed = _graphs[key]
    if graphed is None:
        return None
    out = graphed(q, k, v, q_route, k_route).clone()
    graphed.selection.info["graph"] = True
    return out, graphed.selection
