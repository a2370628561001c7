"""Fused block-sparse flash attention over a MoC Selection, forward and backward, in Triton.

For: the fast GPU path of `moc_attention(..., backend="triton")`. Read in this order: the key-range
plan (how a Selection becomes per-tile key ranges and per-chunk query-tile lists), the forward
inner loop, the forward kernel, the backward kernels, the autograd.Function.
Not for: routing (routing.py, triton_routing.py) or dispatch between backends (attention.py).

How the sparsity is walked:
  forward and dQ: one program per (BLOCK_M query rows, batch*head). Its query tile's union of
      chunks is cut into key ranges: runs of consecutive chunks that every token of the tile attends
      ("full", merged into one range, e.g. a whole 22,500-token shot) and single chunks that only
      some tokens attend ("partial"). A range is walked in BLOCK_N steps from its first key, so
      chunk edges need not sit on the block grid; only the last block of a range masks columns.
      A partial range masks rows with a per-row vector (the row either sees the chunk or not),
      applied through the softmax shift, never as a (BLOCK_M, BLOCK_N) select; a program skips
      a partial range that none of its rows attends.
  dK/dV: one program per (key block, batch*head); key blocks never straddle a chunk, so each
      program walks the inverse list "query tiles whose union holds my chunk" and masks rows
      only on tiles where the chunk is partial, by setting those rows' log-sum-exp to +inf.
Which rows see chunk c: forced[chunk of the row, c] or c in the row's routed slots.
Row order: inside each query chunk the kernels visit rows sorted by their routed chunk sets
(row_order), so that a tile's rows agree more often and its union, the keys it walks, shrinks;
outputs and gradients are written back to the rows' own positions.

Offsets: batch/head/row offsets are int64, so sequences past 2^31 elements address correctly.
Shapes: B batch, H heads, Nq queries (layout tokens [q_offset, q_offset + Nq)), N keys, D head dim,
C chunks, R routed slots, T query tiles (selection.tile rows), E key ranges per tile (<= C).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .selection import Selection

HEAD_DIMS = (64, 128)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # float32 runs the dots in tf32 on the GPU
BLOCK_KV_BWD = 128  # keys per dK/dV program; the per-chunk key blocks are cut to this size


# ---------------------------------------------------------------------------------------------
# The plan: a Selection as key ranges per query tile, and query-tile lists per key chunk
# ---------------------------------------------------------------------------------------------

@dataclass
class KeyRanges:
    """Per query tile: key ranges [lo, hi) in ascending order; chunk = -1 for full ranges."""

    lo: torch.Tensor  # (B, H, T, E) int32 first key of each range
    hi: torch.Tensor  # (B, H, T, E) int32 one past its last key
    chunk: torch.Tensor  # (B, H, T, E) int32 the chunk of a partial range, -1 when full
    count: torch.Tensor  # (B, H, T) int32 ranges per tile

    def keys_per_tile(self) -> torch.Tensor:
        """(B, H, T) int64 keys each tile walks (the kernel's work, before block rounding)."""
        valid = torch.arange(self.lo.shape[-1], device=self.lo.device) < self.count[..., None].long()
        return ((self.hi - self.lo).long() * valid).sum(-1)


def token_chunks(layout, start: int, stop: int, device) -> torch.Tensor:
    """(stop - start,) int32 chunk of layout tokens [start, stop), computed on `device` from the
    chunk ends (no copy of the per-token table)."""
    ends = layout.tensors_on(device).chunk_end
    return torch.bucketize(torch.arange(start, stop, device=device), ends, right=True).to(torch.int32)


def _chunk_bounds(selection: Selection) -> tuple[torch.Tensor, torch.Tensor]:
    lt = selection.layout.tensors_on(selection.routed.device)
    return lt.chunk_start, lt.chunk_end


@triton.jit
def _key_ranges_kernel(TILE_CHUNKS, TILE_FULL, chunk_start, chunk_end, LO, HI, CHUNK, COUNT, C,
                       C_PAD: tl.constexpr):
    """One (batch*head, tile) per program: the union's chunks -> key ranges (see key_ranges)."""
    row = tl.program_id(0).to(tl.int64) * C
    offs = tl.arange(0, C_PAD)
    inside = offs < C
    ids = tl.load(TILE_CHUNKS + row + offs, mask=inside, other=-1)
    full = (tl.load(TILE_FULL + row + offs, mask=inside, other=0) != 0) & (ids >= 0)
    prev = offs >= 1
    prev_ids = tl.load(TILE_CHUNKS + row + offs - 1, mask=prev & inside, other=-2)
    prev_full = tl.load(TILE_FULL + row + offs - 1, mask=prev & inside, other=0) != 0
    nxt = (offs + 1) < C
    next_ids = tl.load(TILE_CHUNKS + row + offs + 1, mask=nxt, other=-1)
    next_full = tl.load(TILE_FULL + row + offs + 1, mask=nxt, other=0) != 0
    valid = ids >= 0
    starts = valid & ~(full & prev_full & (ids == prev_ids + 1))  # opens a range
    next_starts = (next_ids >= 0) & ~(full & next_full & (next_ids == ids + 1))
    ends = valid & ((next_ids < 0) | next_starts)  # closes one
    entry = tl.cumsum(starts.to(tl.int32), 0) - 1
    safe = tl.maximum(ids, 0)
    tl.store(LO + row + entry, tl.load(chunk_start + safe, mask=starts, other=0).to(tl.int32), mask=starts)
    tl.store(HI + row + entry, tl.load(chunk_end + safe, mask=ends, other=0).to(tl.int32), mask=ends)
    tl.store(CHUNK + row + entry, tl.where(full, -1, ids), mask=starts)
    tl.store(COUNT + tl.program_id(0), tl.sum(starts.to(tl.int32), 0))


# The smallest chunk-count bucket a kernel is compiled for (a constexpr: each new bucket compiles,
# and the routing top-k autotunes, on first use). One bucket up to 128 chunks (MoC-180k has 120)
# lets a story's shorter layouts (a regeneration's context passes over 1, 2, ... shots) reuse
# the variants its full length compiled; on an H100 a cold both-sided regeneration of the 180k
# story spent about 50 s compiling per-bucket variants. The kernels mask past the chunk count,
# so the padding costs a few masked loads per program.
CHUNK_BUCKET_MIN = 128


def chunk_bucket(num_chunks: int) -> int:
    """The power of two a kernel pads `num_chunks` to: at least CHUNK_BUCKET_MIN."""
    return max(triton.next_power_of_2(num_chunks), CHUNK_BUCKET_MIN)


def key_ranges(selection: Selection) -> KeyRanges:
    """Merge each tile's union chunks into ranges: consecutive full chunks form one range, a
    partial chunk is a range of its own (its rows are masked as a whole). One small kernel;
    `key_ranges_reference` is the same in PyTorch."""
    ids = selection.tile_chunks.contiguous()  # (B, H, T, C) int32
    B, H, T, C = ids.shape
    lo, hi, chunk = (torch.empty_like(ids) for _ in range(3))
    count = torch.empty(B, H, T, dtype=torch.int32, device=ids.device)
    start, end = _chunk_bounds(selection)
    _key_ranges_kernel[(B * H * T,)](ids, selection.tile_full.contiguous().view(torch.int8), start, end,
                                     lo, hi, chunk, count, C, C_PAD=chunk_bucket(C))
    return KeyRanges(lo, hi, chunk, count)


def key_ranges_reference(selection: Selection) -> KeyRanges:
    """key_ranges in PyTorch (the specification the kernel is tested against); entries past
    each tile's count are 0 / 0 / -1 here and undefined in the kernel's output."""
    chunk_start, chunk_end = _chunk_bounds(selection)
    ids = selection.tile_chunks.long()  # (B, H, T, C) ascending, then -1
    C = ids.shape[-1]
    valid = ids >= 0
    full = selection.tile_full & valid
    prev_ids = torch.nn.functional.pad(ids, (1, 0), value=-2)[..., :-1]
    prev_full = torch.nn.functional.pad(full, (1, 0), value=False)[..., :-1]
    starts = valid & ~(full & prev_full & (ids == prev_ids + 1))  # this chunk opens a new range
    entry = torch.where(valid, starts.long().cumsum(-1) - 1, C)  # range of every chunk; spare C
    safe = ids.clamp(min=0)
    lo = torch.zeros(*ids.shape[:-1], C + 1, dtype=torch.int64, device=ids.device)
    hi = torch.zeros_like(lo)
    chunk = torch.full_like(lo, -1)
    lo.scatter_(-1, torch.where(starts, entry, C), chunk_start[safe])
    hi.scatter_reduce_(-1, entry, chunk_end[safe], reduce="amax")  # ranges end at their last chunk
    chunk.scatter_(-1, torch.where(starts & ~full, entry, C), safe)
    count = starts.sum(-1, dtype=torch.int32)
    return KeyRanges(lo[..., :C].to(torch.int32).contiguous(), hi[..., :C].to(torch.int32).contiguous(),
                     chunk[..., :C].to(torch.int32).contiguous(), count.contiguous())


def row_order(selection: Selection) -> torch.Tensor:
    """(B, H, Nq) int32: the query rows in the order the kernels process them. Rows are sorted
    inside their own query chunk by the set of chunks they routed to, so rows that route alike
    share tiles and each tile's union (the keys it walks) shrinks; the chunk of every position,
    hence every forced link, is unchanged."""
    routed = selection.routed.long()  # (B, H, Nq, R)
    C = selection.layout.num_chunks
    ids = torch.where(routed >= 0, routed, C).sort(-1).values  # ascending, empty slots last
    digits = max(1, min(ids.shape[-1], int(62 // math.log2(C + 1))))  # base-(C+1) digits an int64 holds
    key = torch.zeros(ids.shape[:-1], dtype=torch.int64, device=ids.device)
    for j in range(digits):
        key = key * (C + 1) + ids[..., j]
    order = key.argsort(dim=-1, stable=True)
    Nq = routed.shape[2]
    qc = token_chunks(selection.layout, selection.q_offset, selection.q_offset + Nq, routed.device).long()
    order = order.gather(-1, qc[order].argsort(dim=-1, stable=True))  # back to chunk order, stably
    return order.to(torch.int32).contiguous()


@dataclass
class KernelPlan:
    """Everything the kernels walk, built once per forward and kept for the backward."""

    perm: torch.Tensor  # (B, H, Nq) int32 query row at each kernel position (row_order)
    tiles: Selection  # the selection with its rows in that order: its tile unions drive the walk
    ranges: KeyRanges  # key ranges of those tiles


def ordered_tiles(selection: Selection) -> tuple[torch.Tensor, Selection]:
    """(row_order, the selection with its rows in that order): the tile unions the kernels walk."""
    B, H, Nq, R = selection.routed.shape
    perm = row_order(selection)
    routed = selection.routed.gather(2, perm.long()[..., None].expand(B, H, Nq, R))
    return perm, Selection.build(selection.layout, selection.tile, selection.forced, routed, selection.q_offset,
                                 selection.forced_host)


def kernel_plan(selection: Selection) -> KernelPlan:
    perm, tiles = ordered_tiles(selection)
    return KernelPlan(perm, tiles, key_ranges(tiles))


@dataclass
class TileLists:
    """Per key chunk: the query tiles whose union holds it (the key -> query inverse lists)."""

    tiles: torch.Tensor  # (B, H, C, T) int32 tile ids ascending, then -1
    full: torch.Tensor  # (B, H, C, T) int8 1 when every token of the tile attends the chunk
    count: torch.Tensor  # (B, H, C) int32 tiles per chunk


def tile_lists(selection: Selection) -> TileLists:
    ids = selection.tile_chunks.long()  # (B, H, T, C)
    B, H, T, C = ids.shape
    spare = torch.where(ids >= 0, ids, C)
    union = torch.zeros(B, H, T, C + 1, dtype=torch.int8, device=ids.device)
    union.scatter_(-1, spare, 1)
    full = torch.zeros_like(union)
    full.scatter_(-1, spare, selection.tile_full.to(torch.int8))
    union = union[..., :C].transpose(-1, -2)  # (B, H, C, T)
    full = full[..., :C].transpose(-1, -2)
    t = torch.arange(T, device=ids.device)
    order = torch.where(union.bool(), t, T + t).argsort(-1)  # member tiles first, ascending
    member = union.gather(-1, order).bool()
    tiles = torch.where(member, order, -1).to(torch.int32).contiguous()
    return TileLists(tiles, full.gather(-1, order).contiguous(), member.sum(-1, dtype=torch.int32).contiguous())


def key_blocks(selection: Selection, block: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut every chunk into blocks of <= `block` keys: (lo, hi, chunk), each (KB,) int32 (made
    and copied to `device` once per layout and block size)."""
    return selection.layout.memo(("key_blocks", block, str(torch.device(device))),
                                 lambda: _key_blocks(selection.layout, block, device))


def _key_blocks(layout, block: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lt = layout.tensors
    n = (lt.chunk_len + block - 1) // block  # (C,) blocks per chunk
    chunk = torch.repeat_interleave(torch.arange(len(n)), n)
    first = torch.cumsum(n, 0) - n  # first block of each chunk
    lo = lt.chunk_start[chunk] + (torch.arange(int(n.sum())) - first[chunk]) * block
    hi = torch.minimum(lo + block, lt.chunk_end[chunk])
    return tuple(x.to(device=device, dtype=torch.int32) for x in (lo, hi, chunk))


# ---------------------------------------------------------------------------------------------
# Row masks: which query rows attend chunk c
# ---------------------------------------------------------------------------------------------

@triton.jit
def _rows_attend(c, offs_m, row_valid, routed_ptrs, stride_rr, qchunk_ptr, forced_ptr, C,
                 R: tl.constexpr, R_PAD: tl.constexpr):
    """(BLOCK_M,) bool: row m (a query) attends chunk c, forced or routed."""
    offs_r = tl.arange(0, R_PAD)
    slots = tl.load(routed_ptrs + offs_r[None, :] * stride_rr,
                    mask=row_valid[:, None] & (offs_r[None, :] < R), other=-1)  # (BLOCK_M, R_PAD)
    routed = tl.max((slots == c).to(tl.int32), axis=1) > 0
    qc = tl.load(qchunk_ptr + offs_m, mask=row_valid, other=0)
    forced = tl.load(forced_ptr + qc.to(tl.int64) * C + c, mask=row_valid, other=0) != 0
    return routed | forced


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------

@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, row_ok, K_block_ptr, V_block_ptr, start_n, hi, stride_kn, stride_vn,
                    qk_scale, offs_n, MASK_COLS: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr):
    """One BLOCK_N step of online softmax. Rows with row_ok False are left untouched: their shift
    is +inf so p = 0, and their running max stays as it was."""
    if MASK_COLS:
        col_ok = (start_n + offs_n) < hi
        k = tl.load(K_block_ptr, mask=col_ok[None, :], other=0.0)  # (D, BLOCK_N)
    else:
        k = tl.load(K_block_ptr)
    qk = tl.dot(q, k)  # (BLOCK_M, BLOCK_N) fp32
    if MASK_COLS:
        qk = tl.where(col_ok[None, :], qk, float("-inf"))
    m_ij = tl.where(row_ok, tl.maximum(m_i, tl.max(qk, 1) * qk_scale), m_i)
    shift = tl.where(row_ok, m_ij, float("inf"))
    p = tl.math.exp2(qk * qk_scale - shift[:, None])
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if MASK_COLS:
        v = tl.load(V_block_ptr, mask=col_ok[:, None], other=0.0)  # (BLOCK_N, D)
    else:
        v = tl.load(V_block_ptr)
    acc = tl.dot(p.to(DTYPE), v, acc)
    return acc, l_i, m_ij


@triton.jit
def _attn_fwd_range(acc, l_i, m_i, q, row_ok, k_base, v_base, lo, hi, stride_kn, stride_vn, qk_scale,
                    offs_n, offs_d, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr):
    """Walk keys [lo, hi): whole blocks unmasked, then one column-masked tail block."""
    K_ptrs = k_base + lo.to(tl.int64) * stride_kn + offs_n[None, :] * stride_kn + offs_d[:, None]  # (D, BLOCK_N)
    V_ptrs = v_base + lo.to(tl.int64) * stride_vn + offs_n[:, None] * stride_vn + offs_d[None, :]  # (BLOCK_N, D)
    n_whole = (hi - lo) // BLOCK_N
    for _ in range(0, n_whole):
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, row_ok, K_ptrs, V_ptrs, 0, hi, stride_kn, stride_vn,
                                        qk_scale, offs_n, False, BLOCK_N, DTYPE)
        K_ptrs += BLOCK_N * stride_kn
        V_ptrs += BLOCK_N * stride_vn
    start_n = lo + n_whole * BLOCK_N
    if start_n < hi:
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, row_ok, K_ptrs, V_ptrs, start_n, hi, stride_kn,
                                        stride_vn, qk_scale, offs_n, True, BLOCK_N, DTYPE)
    return acc, l_i, m_i


def _fwd_configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2),
                                 (64, 128, 4, 3), (64, 64, 4, 4)]]


SMALL_PROBLEM = 1 << 17  # query rows x heads below which autotuning costs more than it can save


def _prune_configs(configs, named_args, **kwargs):
    """Keep the configs whose BLOCK_M divides the selection's tile (a program stays in one tile);
    on small problems keep only the first of them."""
    ok = [c for c in configs if kwargs["TILE"] % c.kwargs["BLOCK_M"] == 0]
    ok = ok or [triton.Config({**configs[-1].kwargs, "BLOCK_M": kwargs["TILE"]}, num_warps=4, num_stages=2)]
    return ok[:1] if named_args["NQ"] * named_args["H"] < SMALL_PROBLEM else ok


def _tuned(kernel, configs):
    """The autotuned launcher of a kernel; tuned once per (head dim, tile, routed slots, dtypes): not per
    sequence length, so training on stories of many lengths tunes once, not once per length."""
    return triton.autotune(configs=configs, key=["HEAD_DIM", "TILE", "R"],
                           prune_configs_by={"early_config_prune": _prune_configs})(kernel)


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, PERM, sm_scale,
              range_lo, range_hi, range_chunk, range_count,
              routed, qchunk, forced,
              stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
              stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
              stride_rb, stride_rh, stride_rm, stride_rr,
              H, NQ, C, T,
              HEAD_DIM: tl.constexpr, TILE: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    DTYPE: tl.constexpr = Q.dtype.element_ty
    start_m = tl.program_id(0)
    off_hz = tl.program_id(1)
    off_b = (off_hz // H).to(tl.int64)
    off_h = (off_hz % H).to(tl.int64)
    tile = (start_m * BLOCK_M) // TILE
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_valid = offs_m < NQ
    rows64 = tl.load(PERM + off_hz.to(tl.int64) * NQ + offs_m, mask=row_valid, other=0).to(tl.int64)  # tokens
    # 1. the query tile, kept in registers
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + rows64[:, None] * stride_qm + offs_d[None, :],
                mask=row_valid[:, None], other=0.0)  # (BLOCK_M, D)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    routed_ptrs = routed + off_b * stride_rb + off_h * stride_rh + rows64[:, None] * stride_rm  # (BLOCK_M, 1)
    qk_scale = sm_scale * 1.44269504  # log2(e): exp2 instead of exp
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30  # finite: a fully masked step gives alpha = 1
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    all_rows = tl.full([BLOCK_M], 1, tl.int1)
    # 2. walk the tile's key ranges
    plan = (off_hz.to(tl.int64) * T + tile) * C
    n_ranges = tl.load(range_count + off_hz.to(tl.int64) * T + tile)
    for e in range(0, n_ranges):
        lo = tl.load(range_lo + plan + e)
        hi = tl.load(range_hi + plan + e)
        c = tl.load(range_chunk + plan + e)
        row_ok = all_rows
        if c >= 0:  # partial chunk: only some rows of the tile attend it; none of ours: skip it
            row_ok = _rows_attend(c, offs_m, row_valid, routed_ptrs, stride_rr, qchunk, forced, C, R, R_PAD)
            hi = tl.where(tl.max(row_ok.to(tl.int32), 0) > 0, hi, lo)
        acc, l_i, m_i = _attn_fwd_range(acc, l_i, m_i, q, row_ok, k_base, v_base, lo, hi, stride_kn, stride_vn,
                                        qk_scale, offs_n, offs_d, BLOCK_N, DTYPE)
    # 3. normalise, store the output and the log2-sum-exp the backward needs
    acc = acc / l_i[:, None]
    tl.store(LSE + off_hz.to(tl.int64) * NQ + offs_m, m_i + tl.math.log2(l_i), mask=row_valid)
    tl.store(O + off_b * stride_ob + off_h * stride_oh + rows64[:, None] * stride_om + offs_d[None, :],
             acc.to(DTYPE), mask=row_valid[:, None])


_attn_fwd_tuned = _tuned(_attn_fwd, _fwd_configs())


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------

@triton.jit
def _attn_bwd_preprocess(O, DO, DELTA, stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom,
                         H, NQ, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O), the softmax-gradient correction, (B, H, Nq) fp32."""
    off_hz = tl.program_id(1)
    off_b = (off_hz // H).to(tl.int64)
    off_h = (off_hz % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows64 = offs_m.to(tl.int64)
    ok = offs_m < NQ
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + rows64[:, None] * stride_om + offs_d[None, :],
                mask=ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + rows64[:, None] * stride_dom + offs_d[None, :],
                 mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + off_hz.to(tl.int64) * NQ + offs_m, tl.sum(o * do, axis=1), mask=ok)


def _dkdv_configs():
    return [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
            for bm, w, s in [(64, 8, 3), (32, 4, 3), (64, 8, 2), (32, 8, 3)]]


@triton.jit
def _key_block(K, V, kb_lo, kb_hi, kb_chunk, pid_n, off_b, off_h, stride_kb, stride_kh, stride_kn,
               stride_vb, stride_vh, stride_vn, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    """The prologue of a dK/dV program: key block pid_n's chunk, its column range [lo, hi), and its
    keys and values (BLOCK_N, D) with the columns past hi loaded as 0."""
    lo = tl.load(kb_lo + pid_n)
    hi = tl.load(kb_hi + pid_n)
    c = tl.load(kb_chunk + pid_n)
    offs_n = lo + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    cols64 = offs_n.to(tl.int64)
    col_ok = offs_n < hi
    k = tl.load(K + off_b * stride_kb + off_h * stride_kh + cols64[:, None] * stride_kn + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)
    v = tl.load(V + off_b * stride_vb + off_h * stride_vh + cols64[:, None] * stride_vn + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)
    return c, lo, hi, offs_n, offs_d, cols64, col_ok, k, v


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, PERM, sm_scale,
                   kb_lo, kb_hi, kb_chunk, list_tiles, list_full, list_count,
                   routed, qchunk, forced,
                   stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                   stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                   stride_rb, stride_rh, stride_rm, stride_rr,
                   H, NQ, C, T,
                   HEAD_DIM: tl.constexpr, TILE: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV of one key block (inside one chunk c) over the query tiles whose union holds c."""
    DTYPE: tl.constexpr = Q.dtype.element_ty
    SUB: tl.constexpr = TILE // BLOCK_M  # query sub-blocks per tile
    pid_n = tl.program_id(0)
    off_hz = tl.program_id(1)
    off_b = (off_hz // H).to(tl.int64)
    off_h = (off_hz % H).to(tl.int64)
    # 1. this block's keys and values, kept in registers; columns past hi are loaded as 0 and never stored
    c, lo, hi, offs_n, offs_d, cols64, col_ok, k, v = _key_block(
        K, V, kb_lo, kb_hi, kb_chunk, pid_n, off_b, off_h, stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn, HEAD_DIM, BLOCK_N)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    qk_scale = sm_scale * 1.44269504
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    do_base = DO + off_b * stride_dob + off_h * stride_doh
    r_base = routed + off_b * stride_rb + off_h * stride_rh
    stat_base = off_hz.to(tl.int64) * NQ
    lists = (off_hz.to(tl.int64) * C + c) * T
    n_tiles = tl.load(list_count + off_hz.to(tl.int64) * C + c)
    # 2. walk (tile, sub-block) pairs of the inverse list as one flat loop, so it pipelines
    for it in range(0, n_tiles * SUB):
        t = tl.load(list_tiles + lists + it // SUB)
        full = tl.load(list_full + lists + it // SUB)
        offs_m = t * TILE + (it % SUB) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_valid = offs_m < NQ
        rows64 = tl.load(PERM + stat_base + offs_m, mask=row_valid, other=0).to(tl.int64)
        q = tl.load(q_base + rows64[:, None] * stride_qm + offs_d[None, :], mask=row_valid[:, None], other=0.0)
        do = tl.load(do_base + rows64[:, None] * stride_dom + offs_d[None, :], mask=row_valid[:, None], other=0.0)
        lse = tl.load(LSE + stat_base + offs_m, mask=row_valid, other=float("inf"))
        delta = tl.load(DELTA + stat_base + rows64, mask=row_valid, other=0.0)
        # rows that do not attend c get lse = +inf, hence p = 0 and ds = 0: a vector mask, no 2-D select
        rows = _rows_attend(c, offs_m, row_valid & (full == 0), r_base + rows64[:, None] * stride_rm, stride_rr,
                            qchunk, forced, C, R, R_PAD)
        lse = tl.where(rows | (full != 0), lse, float("inf"))
        qkT = tl.dot(k, tl.trans(q))  # (BLOCK_N, BLOCK_M)
        pT = tl.math.exp2(qkT * qk_scale - lse[None, :])
        dv = tl.dot(pT.to(DTYPE), do, dv)
        dpT = tl.dot(v, tl.trans(do)).to(tl.float32)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(DTYPE), q, dk)
    # 3. store
    dk *= sm_scale
    tl.store(DK + off_b * stride_dkb + off_h * stride_dkh + cols64[:, None] * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + off_b * stride_dvb + off_h * stride_dvh + cols64[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


_attn_bwd_dkdv_tuned = _tuned(_attn_bwd_dkdv, _dkdv_configs())


@triton.jit
def _attn_bwd_dq_range(dq, q, do, lse, delta, k_base, v_base, lo, hi, stride_kn, stride_vn, qk_scale,
                       offs_n, offs_d, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr):
    """dQ over keys [lo, hi). Columns past hi load k = v = 0, so their ds * k adds nothing."""
    K_ptrs = k_base + lo.to(tl.int64) * stride_kn + offs_n[None, :] * stride_kn + offs_d[:, None]  # (D, BLOCK_N)
    V_ptrs = v_base + lo.to(tl.int64) * stride_vn + offs_n[None, :] * stride_vn + offs_d[:, None]  # (D, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        col_ok = (start_n + offs_n) < hi
        kT = tl.load(K_ptrs, mask=col_ok[None, :], other=0.0)
        vT = tl.load(V_ptrs, mask=col_ok[None, :], other=0.0)
        qk = tl.dot(q, kT)  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(qk * qk_scale - lse[:, None])
        dp = tl.dot(do, vT).to(tl.float32)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(DTYPE), tl.trans(kT), dq)
        K_ptrs += BLOCK_N * stride_kn
        V_ptrs += BLOCK_N * stride_vn
    return dq


def _dq_configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3), (64, 128, 8, 3)]]


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, PERM, sm_scale,
                 range_lo, range_hi, range_chunk, range_count,
                 routed, qchunk, forced,
                 stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                 stride_dqb, stride_dqh, stride_dqm,
                 stride_rb, stride_rh, stride_rm, stride_rr,
                 H, NQ, C, T,
                 HEAD_DIM: tl.constexpr, TILE: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ of BLOCK_M query rows over the same key ranges as the forward."""
    DTYPE: tl.constexpr = Q.dtype.element_ty
    start_m = tl.program_id(0)
    off_hz = tl.program_id(1)
    off_b = (off_hz // H).to(tl.int64)
    off_h = (off_hz % H).to(tl.int64)
    tile = (start_m * BLOCK_M) // TILE
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_valid = offs_m < NQ
    rows64 = tl.load(PERM + off_hz.to(tl.int64) * NQ + offs_m, mask=row_valid, other=0).to(tl.int64)  # tokens
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + rows64[:, None] * stride_qm + offs_d[None, :],
                mask=row_valid[:, None], other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + rows64[:, None] * stride_dom + offs_d[None, :],
                 mask=row_valid[:, None], other=0.0)
    lse_rows = tl.load(LSE + off_hz.to(tl.int64) * NQ + offs_m, mask=row_valid, other=float("inf"))
    delta = tl.load(DELTA + off_hz.to(tl.int64) * NQ + rows64, mask=row_valid, other=0.0)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    routed_ptrs = routed + off_b * stride_rb + off_h * stride_rh + rows64[:, None] * stride_rm
    qk_scale = sm_scale * 1.44269504
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    plan = (off_hz.to(tl.int64) * T + tile) * C
    n_ranges = tl.load(range_count + off_hz.to(tl.int64) * T + tile)
    for e in range(0, n_ranges):
        lo = tl.load(range_lo + plan + e)
        hi = tl.load(range_hi + plan + e)
        c = tl.load(range_chunk + plan + e)
        lse = lse_rows
        if c >= 0:  # partial chunk: rows that do not attend it get p = 0 through lse = +inf
            rows = _rows_attend(c, offs_m, row_valid, routed_ptrs, stride_rr, qchunk, forced, C, R, R_PAD)
            lse = tl.where(rows, lse_rows, float("inf"))
            hi = tl.where(tl.max(rows.to(tl.int32), 0) > 0, hi, lo)  # none of our rows: skip it
        dq = _attn_bwd_dq_range(dq, q, do, lse, delta, k_base, v_base, lo, hi, stride_kn, stride_vn, qk_scale,
                                offs_n, offs_d, BLOCK_N, DTYPE)
    dq *= sm_scale
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + rows64[:, None] * stride_dqm + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_valid[:, None])


_attn_bwd_dq_tuned = _tuned(_attn_bwd_dq, _dq_configs())


# ---------------------------------------------------------------------------------------------
# autograd.Function and the entry point
# ---------------------------------------------------------------------------------------------

def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """Kernels take any (B, H, N, D) strides as long as D is contiguous (transposed views of
    (B, N, H, D) qualify); anything else is copied once."""
    return x if x.stride(-1) == 1 else x.contiguous()


CPU_META = {"BLOCK_M": 16, "BLOCK_N": 16}  # the CPU interpreter (tests): small blocks, no autotuning


def _launch(kernel, tuned, grid, *args, **kwargs):
    """Autotuned launch on the GPU; one small fixed config under TRITON_INTERPRET on CPU tensors."""
    if args[0].is_cuda:
        tuned[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **{**CPU_META, **kwargs})


def _selection_args(selection: Selection):
    routed = selection.routed  # (B, H, Nq, R) int32
    Nq = routed.shape[2]
    qchunk = token_chunks(selection.layout, selection.q_offset, selection.q_offset + Nq, routed.device)  # (Nq,)
    forced = selection.forced.to(torch.int8).contiguous()  # (C, C)
    R = routed.shape[-1]
    return routed, qchunk, forced, R, max(triton.next_power_of_2(R), 2)


def _forward(q, k, v, selection: Selection, sm_scale: float, plan: KernelPlan | None = None):
    """The fused forward: (o, lse in the kernel's row order (log2 units), the plan); `plan`: the
    selection's kernel_plan when the caller already built it."""
    B, H, Nq, D = q.shape
    C = selection.layout.num_chunks
    T = selection.tile_count.shape[-1]
    plan = kernel_plan(selection) if plan is None else plan
    ranges = plan.ranges
    routed, qchunk, forced, R, R_PAD = _selection_args(selection)
    o = torch.empty_like(q)  # keeps q's strides: a (B, N, H, D) caller gets its layout back
    lse = torch.empty(B, H, Nq, device=q.device, dtype=torch.float32)

    def grid(meta):
        return (triton.cdiv(Nq, meta["BLOCK_M"]), B * H)

    _launch(_attn_fwd, _attn_fwd_tuned, grid, q, k, v, o, lse, plan.perm, sm_scale,
            ranges.lo, ranges.hi, ranges.chunk, ranges.count, routed, qchunk, forced,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], *routed.stride(),
            H, Nq, C, T, HEAD_DIM=D, TILE=selection.tile, R=R, R_PAD=R_PAD)
    return o, lse, plan


def _delta(o: torch.Tensor, do: torch.Tensor) -> torch.Tensor:
    """rowsum(dO * O), (B, H, Nq) float32 in row order."""
    B, H, Nq, D = o.shape
    delta = torch.empty(B, H, Nq, device=o.device, dtype=torch.float32)
    _attn_bwd_preprocess[(triton.cdiv(Nq, 64), B * H)](o, do, delta, *o.stride()[:3], *do.stride()[:3],
                                                       H, Nq, HEAD_DIM=D, BLOCK_M=64)
    return delta


def _backward(q, k, v, do, lse, delta, selection: Selection, plan: KernelPlan, sm_scale: float, out=None):
    """dQ, dK, dV of the attention over `selection`'s links, given the softmax statistics: lse in
    the plan's kernel row order (log2 units) and delta in row order. With the statistics of a larger
    attention (more links than the selection's), these are that attention's gradients restricted to
    the selection's links (backend "gather" adds its routed links' share). out: (dq, dk, dv) to
    write into (any strides with a contiguous last dimension, any float dtype: each is stored in
    its own; gather passes a float32 dQ and head slices of the final dK, dV); default new tensors
    like q, k, v."""
    ranges = plan.ranges
    B, H, Nq, D = q.shape
    C = selection.layout.num_chunks
    T = selection.tile_count.shape[-1]
    routed, qchunk, forced, R, R_PAD = _selection_args(selection)
    dq, dk, dv = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)) if out is None else out
    lists = tile_lists(plan.tiles)
    block_kv = BLOCK_KV_BWD if q.is_cuda else CPU_META["BLOCK_N"]
    kb_lo, kb_hi, kb_chunk = key_blocks(selection, block_kv, q.device)
    _launch(_attn_bwd_dkdv, _attn_bwd_dkdv_tuned, (kb_lo.numel(), B * H),
            q, k, v, do, dk, dv, lse, delta, plan.perm, sm_scale,
            kb_lo, kb_hi, kb_chunk, lists.tiles, lists.full, lists.count, routed, qchunk, forced,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3],
            *dv.stride()[:3], *routed.stride(), H, Nq, C, T,
            HEAD_DIM=D, TILE=selection.tile, R=R, R_PAD=R_PAD, BLOCK_N=block_kv)

    def grid(meta):
        return (triton.cdiv(Nq, meta["BLOCK_M"]), B * H)

    _launch(_attn_bwd_dq, _attn_bwd_dq_tuned, grid, q, k, v, do, dq, lse, delta, plan.perm, sm_scale,
            ranges.lo, ranges.hi, ranges.chunk, ranges.count, routed, qchunk, forced,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3],
            *routed.stride(), H, Nq, C, T, HEAD_DIM=D, TILE=selection.tile, R=R, R_PAD=R_PAD)
    return dq, dk, dv


class _MoCAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, selection: Selection, sm_scale: float, plan: KernelPlan | None):
        o, lse, plan = _forward(q, k, v, selection, sm_scale, plan)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.selection, ctx.plan, ctx.sm_scale = selection, plan, sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        do = _last_dim_contiguous(do)
        delta = _delta(o, do)
        dq, dk, dv = _backward(q, k, v, do, lse, delta, ctx.selection, ctx.plan, ctx.sm_scale)
        return dq, dk, dv, None, None, None


def check_inputs(q, k, v, selection: Selection, backend: str = "triton") -> None:
    """What the fused kernels take (both backends that run them: "triton" and "gather"); a clear
    error otherwise."""
    name = f"the {backend} backend"
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{name} takes q, k, v of one dtype in {DTYPES}; got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}: cast them with .to(torch.bfloat16)")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"{name} supports head dims {HEAD_DIMS}, got {q.shape[-1]}: "
                         "use backend='flex' or 'reference' for other sizes")
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"{name} runs on CUDA tensors (on the CPU only under TRITON_INTERPRET=1, for tests); "
                         "use the reference instead")
    if selection.tile < 16:
        raise ValueError(f"{name} needs MoCConfig.tile >= 16 query rows, got {selection.tile}")
    if not (q.device == k.device == v.device == selection.routed.device):
        raise ValueError(f"q, k, v and the selection must be on one device; got {q.device}, {k.device}, "
                         f"{v.device}, selection on {selection.routed.device}")


def triton_moc_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selection: Selection,
                         scale: float | None = None, plan: KernelPlan | None = None) -> torch.Tensor:
    """Block-sparse attention of q (B, H, Nq, D) over k, v (B, H, N, D) restricted to `selection`.
    Any strides with a contiguous last dim are used in place; `plan`: kernel_plan(selection) when
    the caller built it already ("auto" does, to weigh the walk). Returns (B, H, Nq, D) in q's dtype."""
    check_inputs(q, k, v, selection)
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    sm_scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _MoCAttention.apply(q, k, v, selection, sm_scale, plan)


def walk_ratio(selection: Selection, plan: KernelPlan) -> float:
    """(query, key) pairs the tile-union kernels walk with `plan` (tile rows x keys of each tile's
    ranges) / the pairs the selection attends: 1 when every tile's rows route alike, up to
    tile-fold when they share nothing. One host synchronisation."""
    walked = plan.ranges.keys_per_tile().sum() * selection.tile
    return float(walked.double() / selection.attended_keys().sum().clamp_min(1.0))


__all__ = ["check_inputs", "walk_ratio", "KernelPlan", "KeyRanges", "TileLists", "kernel_plan", "ordered_tiles", "row_order", "key_ranges", "key_ranges_reference", "tile_lists", "key_blocks",
           "token_chunks", "triton_moc_attention"]
