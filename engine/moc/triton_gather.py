"""MoC attention whose work follows the routed pairs: per key chunk, the queries that chose it.

For: `gather_moc_attention(q, k, v, selection)`, the forward of backend "gather" (no autograd:
sampling, the context cache). Its work does not depend on how alike neighbouring queries route,
which the tile-union kernels (triton_attention.py) do: a tile there walks the union of every chunk
any of its rows chose, so incoherent routing (random inputs, training's drop-in) walks far more
keys than the density.
Not for: training (use backend "triton", which has a backward), or choosing a backend (attention.py).

Three steps, all on the GPU, no host synchronisation:
1. Forced links (the own shot, the captions: contiguous and shared by whole query chunks, so
   coherent) through the tile-union kernel on a selection without routed chunks, which walks
   exactly them: out O_f and log-sum-exp L_f per query.
2. Routed pairs: every (query, slot) with a routed chunk, sorted by chunk (`routed_pairs`); one
   program per BLOCK_M pairs of one chunk gathers those query rows, walks the chunk's keys once
   and writes the pair's partial out and log-sum-exp into the query's slot.
3. Merge per query: the R + 1 partial results weighted by their log-sum-exp (routed and forced
   chunks are disjoint, so nothing is counted twice).
The grid is sized without knowing how many tiles the chunks need (that would need the host to
read GPU counts): ceil(pairs / BLOCK_M) + C programs per (batch, head) bound them, and the spare
ones exit at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .selection import Selection
from .triton_attention import DTYPES, HEAD_DIMS, _attn_fwd_range, _forward, _last_dim_contiguous

GATHER_BLOCK = {"cuda": (64, 64, 4), "cpu": (16, 16, 1)}  # BLOCK_M, BLOCK_N, warps (CPU: the interpreter)
MERGE_ROWS = 16384  # query rows merged at once (bounds the float32 buffers)


@dataclass
class RoutedPairs:
    """The (query, slot) pairs with a routed chunk, grouped by chunk, per (batch * head)."""

    query: torch.Tensor  # (BH, P) int32 query row of each pair, chunk-major; empty slots at the end
    slot: torch.Tensor  # (BH, P) int32 the pair's slot, row * R + r (where its partial result goes)
    start: torch.Tensor  # (BH, C) int32 first pair of each chunk
    count: torch.Tensor  # (BH, C) int32 pairs of each chunk
    tile_end: torch.Tensor  # (BH, C) int32 cumulative BLOCK_M tiles up to and including each chunk


def routed_pairs(routed: torch.Tensor, num_chunks: int, block_m: int) -> RoutedPairs:
    """routed (B, H, Nq, R) int32 chunk ids (-1 empty) -> the pairs sorted by chunk, then query."""
    B, H, Nq, R = routed.shape
    C = num_chunks
    flat = routed.reshape(B * H, Nq * R).long()
    key = torch.where(flat >= 0, flat, C)  # empty slots sort last, into a spare chunk C
    order = key.argsort(dim=-1, stable=True)  # slot order = query-major, so queries ascend per chunk
    counts = torch.zeros(B * H, C + 1, dtype=torch.int64, device=routed.device)
    counts.scatter_add_(1, key, torch.ones_like(key))
    counts = counts[:, :C]
    start = counts.cumsum(-1) - counts
    tiles = (counts + block_m - 1) // block_m
    return RoutedPairs((order // R).to(torch.int32).contiguous(), order.to(torch.int32).contiguous(),
                       start.to(torch.int32).contiguous(), counts.to(torch.int32).contiguous(),
                       tiles.cumsum(-1).to(torch.int32).contiguous())


@triton.jit
def _routed_fwd(Q, K, V, OP, LP, pair_query, pair_slot, chunk_pair_start, chunk_pair_count, chunk_tile_end,
                chunk_start, chunk_end, sm_scale,
                stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                H, C, P,
                HEAD_DIM: tl.constexpr, C_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: up to BLOCK_M pairs of one chunk (this (batch, head)'s tile t), the chunk's
    keys walked once; each pair's normalised partial out and log2-sum-exp go to its slot."""
    DTYPE: tl.constexpr = Q.dtype.element_ty
    t = tl.program_id(0)
    off_hz = tl.program_id(1)
    off_b = (off_hz // H).to(tl.int64)
    off_h = (off_hz % H).to(tl.int64)
    plan = off_hz.to(tl.int64) * C
    offs_c = tl.arange(0, C_PAD)
    ends = tl.load(chunk_tile_end + plan + offs_c, mask=offs_c < C, other=2147483647)
    c = tl.sum((ends <= t).to(tl.int32), 0)  # the chunk whose tiles hold t (C: a spare program)
    live = c < C
    c = tl.minimum(c, C - 1)
    first_tile = tl.sum(tl.where(offs_c == c - 1, ends, 0), 0)  # tiles before chunk c
    start = tl.load(chunk_pair_start + plan + c)
    count = tl.load(chunk_pair_count + plan + c)
    offs_m = (t - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = (offs_m < count) & live
    pair = off_hz.to(tl.int64) * P + start + offs_m
    rows = tl.load(pair_query + pair, mask=row_valid, other=0).to(tl.int64)
    slots = tl.load(pair_slot + pair, mask=row_valid, other=0).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :],
                mask=row_valid[:, None], other=0.0)  # (BLOCK_M, D): gathered query rows
    lo = tl.load(chunk_start + c)
    hi = tl.load(chunk_end + c)
    hi = tl.where(tl.max(row_valid.to(tl.int32), 0) > 0, hi, lo)  # nothing to do: walk nothing
    qk_scale = sm_scale * 1.44269504
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, l_i, m_i = _attn_fwd_range(acc, l_i, m_i, q, row_valid, K + off_b * stride_kb + off_h * stride_kh,
                                    V + off_b * stride_vb + off_h * stride_vh, lo, hi, stride_kn, stride_vn,
                                    qk_scale, offs_n, offs_d, BLOCK_N, DTYPE)
    l_safe = tl.where(row_valid, l_i, 1.0)
    out = off_hz.to(tl.int64) * P + slots
    tl.store(LP + out, m_i + tl.math.log2(l_safe), mask=row_valid)
    tl.store(OP + out[:, None] * HEAD_DIM + offs_d[None, :], (acc / l_safe[:, None]).to(DTYPE),
             mask=row_valid[:, None])


def forced_only(selection: Selection) -> Selection:
    """The selection's forced links alone (no routed chunks): what step 1 computes."""
    B, H, Nq, _ = selection.routed.shape
    empty = torch.full((B, H, Nq, 1), -1, dtype=torch.int32, device=selection.routed.device)
    return Selection.build(selection.layout, selection.tile, selection.forced, empty, selection.q_offset)


def gather_moc_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selection: Selection,
                         scale: float | None = None) -> torch.Tensor:
    """Block-sparse attention of q (B, H, Nq, D) over k, v (B, H, N, D) restricted to `selection`,
    its routed part computed per key chunk over the queries that chose it. Forward only.
    Returns (B, H, Nq, D) in q's dtype."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        raise ValueError("backend 'gather' has no backward: use backend='triton' to train, or run under torch.no_grad()")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"the gather backend takes q, k, v of one dtype in {DTYPES}; got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}: cast them with .to(torch.bfloat16)")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"the gather backend supports head dims {HEAD_DIMS}, got {q.shape[-1]}: "
                         "use backend='reference' for other sizes")
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the gather backend runs on CUDA tensors (on the CPU only under TRITON_INTERPRET=1, "
                         "for tests); use the reference instead")
    if not (q.device == k.device == v.device == selection.routed.device):
        raise ValueError(f"q, k, v and the selection must be on one device; got {q.device}, {k.device}, "
                         f"{v.device}, selection on {selection.routed.device}")
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    sm_scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    B, H, Nq, D = q.shape
    R = selection.routed.shape[-1]
    C = selection.layout.num_chunks
    # 1. forced links through the tile-union kernel
    o_f, lse_kernel, plan = _forward(q, k, v, forced_only(selection), sm_scale)
    lse_f = torch.empty_like(lse_kernel).scatter_(-1, plan.perm.long(), lse_kernel)  # kernel order -> rows
    # 2. routed pairs, per key chunk
    block_m, block_n, warps = GATHER_BLOCK["cuda" if q.is_cuda else "cpu"]
    pairs = routed_pairs(selection.routed, C, block_m)
    P = Nq * R
    o_r = torch.empty(B * H, P, D, dtype=q.dtype, device=q.device)
    lse_r = torch.full((B * H, P), float("-inf"), dtype=torch.float32, device=q.device)
    lt = selection.layout.tensors_on(q.device)
    grid = (triton.cdiv(P, block_m) + C, B * H)
    _routed_fwd[grid](q, k, v, o_r, lse_r, pairs.query, pairs.slot, pairs.start, pairs.count, pairs.tile_end,
                      lt.chunk_start, lt.chunk_end, sm_scale, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                      H, C, P, HEAD_DIM=D, C_PAD=max(triton.next_power_of_2(C), 2), BLOCK_M=block_m,
                      BLOCK_N=block_n, num_warps=warps)
    # 3. merge the forced and the R routed partial results by their log-sum-exp
    o_r = o_r.view(B, H, Nq, R, D)
    lse_r = lse_r.view(B, H, Nq, R)
    out = torch.empty_like(q)
    for r0 in range(0, Nq, MERGE_ROWS):
        r1 = min(r0 + MERGE_ROWS, Nq)
        lse = torch.cat([lse_f[:, :, r0:r1, None], lse_r[:, :, r0:r1]], dim=-1)  # (B, H, n, 1 + R), log2
        w = torch.exp2(lse - lse.amax(dim=-1, keepdim=True))
        w_r = w[..., 1:, None]
        routed = torch.where(w_r > 0, o_r[:, :, r0:r1].float(), 0.0)  # empty slots were never written
        acc = w[..., 0, None] * o_f[:, :, r0:r1].float() + (w_r * routed).sum(-2)
        out[:, :, r0:r1] = (acc / w.sum(-1, keepdim=True)).to(q.dtype)
    return out


__all__ = ["RoutedPairs", "routed_pairs", "forced_only", "gather_moc_attention"]
