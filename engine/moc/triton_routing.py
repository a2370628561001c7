"""Fused MoC routing on the GPU: chunk descriptors and per-token, per-head top-k in Triton.

For: `route(..., impl="triton")` (routing.py dispatches here). Two kernels:
  _chunk_means: the descriptor of every chunk, the mean of its keys, (B, H, C, D) fp32; one
      program per (chunk, batch*head) reads the chunk's keys once.
  _route_topk: one program per (BLOCK_M query tokens, batch*head) scores the tokens against
      BLOCK_C descriptors at a time in registers, masks forced links and the causal rule, and keeps
      a running top-k (k rounds of a row maximum per block), so no (heads x tokens x chunks) score
      tensor ever reaches memory.
The result is the same Selection as the reference `route` (ties aside: scores are summed in
another order). Training-time drop-off / drop-in reuse the reference's samplers, block by block.
Not for: the routing rules themselves (routing.py states them) or attention.
"""

from __future__ import annotations

import os
import torch
import triton
import triton.language as tl

from .layout import TokenLayout
from .routing import MoCConfig, _drop_in, _drop_off, check_qk, links_on, split_candidates
from .selection import Selection
from .triton_attention import chunk_bucket, token_chunks


@triton.jit
def _chunk_means(K, DESC, chunk_start, chunk_end, stride_kb, stride_kh, stride_kn, H, C,
                 HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr):
    """desc[b, h, c] = mean of k[b, h, chunk_start[c]:chunk_end[c]] in fp32."""
    c = tl.program_id(0)
    off_hz = tl.program_id(1)
    off_b = (off_hz // H).to(tl.int64)
    off_h = (off_hz % H).to(tl.int64)
    lo = tl.load(chunk_start + c)
    hi = tl.load(chunk_end + c)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, HEAD_DIM)
    base = K + off_b * stride_kb + off_h * stride_kh
    acc = tl.zeros([BLOCK_T, HEAD_DIM], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_T):
        rows = start + offs_t
        k = tl.load(base + rows.to(tl.int64)[:, None] * stride_kn + offs_d[None, :], mask=(rows < hi)[:, None],
                    other=0.0)
        acc += k.to(tl.float32)
    total = tl.sum(acc, axis=0)  # (D,)
    tl.store(DESC + (off_hz.to(tl.int64) * C + c) * HEAD_DIM + offs_d, total / (hi - lo).to(tl.float32))


@triton.jit
def _packed_keys(s, cols):
    """(score, chunk) -> one int64 whose order is score first, then the lower chunk id: one max
    reduction then yields both the best score and its chunk. fp32 bits are made order-preserving
    as signed ints by flipping the magnitude bits of negative values."""
    bits = s.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (key.to(tl.int64) << 32) | (2147483647 - cols[None, :]).to(tl.int64)


@triton.jit
def _route_topk(Q, DESC, ROUTED, qchunk, cand, stride_qb, stride_qh, stride_qm,
                stride_rb, stride_rh, stride_rm, H, NQ, C, N_OUT,
                HEAD_DIM: tl.constexpr, TOP_K: tl.constexpr, K_PAD: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """routed[b, h, m, :N_OUT] = the first N_OUT (<= TOP_K) of the TOP_K candidate chunks of query
    m by q . desc, best first, -1 when fewer candidates exist. cand (C, C) int8: query chunk i may
    route to key chunk j.
    Scores: 16-bit q is exact in its own dtype, so q . desc = q . hi + q . lo with desc split into
    two 16-bit halves: two tensor-core dots, fp32-accurate to ~2^-16. fp32 q uses ieee fp32."""
    NONE: tl.constexpr = -9223372036854775807  # below every packed key, -inf scores included
    off_hz = tl.program_id(1)
    off_b = (off_hz // H).to(tl.int64)
    off_h = (off_hz % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_c = tl.arange(0, BLOCK_C)
    slot = tl.arange(0, K_PAD)[None, :]  # (1, K_PAD)
    row_ok = offs_m < NQ
    rows64 = offs_m.to(tl.int64)
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + rows64[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D)
    qc = tl.load(qchunk + offs_m, mask=row_ok, other=0).to(tl.int64)  # (BLOCK_M,) query chunk
    # running top-k: (BLOCK_M, K_PAD) packed keys, best first, each block merged into it below
    top = tl.full([BLOCK_M, K_PAD], NONE, tl.int64)
    desc_base = DESC + off_hz.to(tl.int64) * C * HEAD_DIM
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + offs_c
        col_ok = cols < C
        desc = tl.load(desc_base + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        if Q.dtype.element_ty == tl.float32:
            s = tl.dot(q, tl.trans(desc), input_precision="ieee")  # (BLOCK_M, BLOCK_C) fp32 scores
        else:
            hi = desc.to(Q.dtype.element_ty)
            lo = (desc - hi.to(tl.float32)).to(Q.dtype.element_ty)
            s = tl.dot(q, tl.trans(hi), tl.dot(q, tl.trans(lo)))
        allowed = tl.load(cand + qc[:, None] * C + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                          other=0) != 0
        key = tl.where(allowed, _packed_keys(s, cols), NONE)
        # merge the block into the running top-k: TOP_K rounds of "take the larger of the two
        # maxima"; packed keys are unique (the chunk id is in them), so each round removes exactly
        # the one it took. k row reductions instead of tl.topk's bitonic sort of the whole block.
        merged = tl.full([BLOCK_M, K_PAD], NONE, tl.int64)
        for r in tl.static_range(TOP_K):
            best = tl.maximum(tl.max(key, axis=1), tl.max(top, axis=1))[:, None]
            merged = tl.where(slot == r, best, merged)
            key = tl.where(key == best, NONE, key)
            top = tl.where(top == best, NONE, top)
        top = merged
    # write the TOP_K best, best first; NONE (fewer candidates than k) becomes -1
    chunk = 2147483647 - (top & 0xFFFFFFFF).to(tl.int32)
    out = ROUTED + off_b * stride_rb + off_h * stride_rh + rows64[:, None] * stride_rm + slot
    tl.store(out, tl.where(top > NONE, chunk, -1), mask=row_ok[:, None] & (slot < N_OUT))


# Chunks scored at once: a story with more runs the blocks in turn, merging each into the running
# top-k. 256 holds MoC-180k's 120 chunks in one block.
BLOCK_C_MAX = 256


def block_c(num_chunks: int) -> int:
    """The kernel's chunk block for a story of `num_chunks` chunks: chunk_bucket's (128 up to 128
    chunks), at most BLOCK_C_MAX. Every compiled variant is autotuned over 8 configs on first use,
    so fewer buckets mean less waiting the first time a story's shorter layouts run (the context
    passes of a regeneration route over 1, 2, ... shots)."""
    return min(chunk_bucket(num_chunks), BLOCK_C_MAX)


# TOP_K is in the key, but the open shots' top-k over later chunks runs with the first top-k's TOP_K
# and stores only its first open_slots (N_OUT), so a both-sided regeneration compiles no variant of
# its own
_route_topk_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=st)
             for bm, w, st in [(64, 4, 2), (32, 4, 2), (128, 8, 2), (64, 8, 1), (32, 8, 1), (32, 2, 1),
                               (16, 2, 1), (16, 4, 1)]],
    # keyed on BLOCK_C (block_c: 128 up to 128 chunks, else 256), not C: keyed on C, training
    # on stories of many lengths re-tuned at each new chunk count (up to 24 of them); run 2's first
    # 200 steps averaged 1.4 s a step against 0.41 s once the lengths had all been seen
    key=["HEAD_DIM", "BLOCK_C", "TOP_K"])(_route_topk)


def triton_chunk_descriptors(k: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Mean key of every chunk, per head: k (B, H, N, D) -> (B, H, C, D) float32."""
    B, H, N, D = k.shape
    if k.stride(-1) != 1:
        k = k.contiguous()
    lt = layout.tensors_on(k.device)
    desc = torch.empty(B, H, layout.num_chunks, D, device=k.device, dtype=torch.float32)
    _chunk_means[(layout.num_chunks, B * H)](k, desc, lt.chunk_start, lt.chunk_end, *k.stride()[:3], H,
                                             layout.num_chunks, HEAD_DIM=D, BLOCK_T=32 if k.is_cuda else 16)
    return desc


@torch.no_grad()
def route_triton(q: torch.Tensor, k: torch.Tensor, layout: TokenLayout, config: MoCConfig, *,
                 q_offset: int = 0, training: bool = False, generator: torch.Generator | None = None,
                 descriptors: torch.Tensor | None = None) -> Selection:
    """`routing.route` with the descriptors and the top-k fused in Triton; same arguments, same
    Selection (ties aside). Head dim must be a power of two >= 16 (Triton's dot)."""
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("fused routing runs on CUDA tensors (on the CPU only under TRITON_INTERPRET=1, for tests); "
                         "use the reference instead")
    check_qk(q, k, layout, q_offset)
    B, H, Nq, D = q.shape
    if D < 16 or D & (D - 1):
        raise ValueError(f"fused routing needs a power-of-two head dim >= 16, got {D}: use route(..., impl='reference')")
    if q.stride(-1) != 1:
        q = q.contiguous()
    device = q.device
    forced, cand = links_on(layout, config, device)
    first, later = layout.memo(("links_int8", config, str(device)), lambda: tuple(
        None if x is None else x.to(torch.int8) for x in split_candidates(layout, config, device)))
    C = layout.num_chunks
    if descriptors is not None and tuple(descriptors.shape) != (B, H, C, D):
        raise ValueError(f"descriptors must be (B={B}, H={H}, C={C}, D={D}), got {tuple(descriptors.shape)}")
    desc = triton_chunk_descriptors(k, layout) if descriptors is None else descriptors.float().contiguous()
    qchunk = token_chunks(layout, q_offset, q_offset + Nq, device)
    kk = min(config.top_k, C)
    routed = torch.full((B, H, Nq, config.max_routed if training else config.routed_slots), -1, dtype=torch.int32,
                        device=device)

    def grid(meta):
        return (triton.cdiv(Nq, meta["BLOCK_M"]), B * H)

    def top(out, allowed, n):
        k = max(n, kk)  # the best n are the first n of the best k (packed keys never tie)
        args = (q, desc, out, qchunk, allowed, *q.stride()[:3], *out.stride()[:3], H, Nq, C, n)
        meta = dict(HEAD_DIM=D, TOP_K=k, K_PAD=max(triton.next_power_of_2(k), 2), BLOCK_C=block_c(C))
        if q.is_cuda:
            _route_topk_tuned[grid](*args, **meta)
        else:  # the CPU interpreter (tests)
            _route_topk[grid](*args, **meta, BLOCK_M=16)

    top(routed, first, kk)
    if later is not None:  # the open shots' own top-k over later chunks, after top_k slots
        top(routed[..., config.top_k:], later, min(config.open_slots, C))
    if training:
        # the reference samplers, in the reference's blocks, so a seeded generator draws the same
        allowed_all = cand
        width = config.topk_width(C)  # what the reference's top-k gave
        for t0 in range(0, Nq, config.route_block):
            t1 = min(t0 + config.route_block, Nq)
            idx = routed[:, :, t0:t1, :width].long()
            idx = _drop_off(idx, config.drop_off, generator)
            extra = _drop_in(idx, allowed_all[qchunk[t0:t1].long()], config, generator)
            idx = torch.cat([idx, extra], dim=-1)
            routed[:, :, t0:t1, :idx.shape[-1]] = idx.to(torch.int32)
    return Selection.build(layout, config.tile, forced, routed, q_offset,
                           forced_host=links_on(layout, config, "cpu")[0])


__all__ = ["route_triton", "triton_chunk_descriptors"]
