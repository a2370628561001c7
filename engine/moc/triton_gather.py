"""MoC attention whose work follows the routed pairs: per key chunk, the queries that chose it.

For: `gather_moc_attention(q, k, v, selection)`, backend "gather" (values and gradients). Its
work does not depend on how alike neighbouring queries route, which the tile-union kernels
(triton_attention.py) do: a tile there walks the union of every chunk any of its rows chose, so
incoherent routing (random inputs, training's drop-in) walks far more keys than the density.
Not for: choosing a backend (attention.py).

Forward, all on the GPU, no host synchronisation:
1. Forced links (the own shot, the captions: contiguous and shared by whole query chunks, so
   coherent): out O_f and log-sum-exp L_f per query, computed one of two ways (`forced`):
   "sdpa" (the default when rendering): one dense SDPA call (cuDNN) per group of query rows that
       share one forced key set (forced.py: planned on the host from the layout), which runs dense
       blocks faster than the tile kernel; it falls back to "triton" where that is not exact or not worth it,
       and says why in selection.info["forced_reason"];
   "triton": the tile-union kernel on a selection without routed chunks, which walks exactly them.
2. Routed pairs: every (query, slot) with a routed chunk, sorted by chunk (`routed_pairs`); one
   program per BLOCK_M pairs of one chunk gathers those query rows, walks the chunk's keys once
   and writes the pair's partial out and log-sum-exp into the query's slot.
3. Merge per query (`merge_partials`, one kernel reading each partial result once): the R + 1
   partial results weighted by their log-sum-exp (routed and forced chunks are disjoint, so nothing
   is counted twice); the merged log-sum-exp is kept. Step 1 runs once over all heads and writes
   the output itself; steps 2 and 3 run per group of heads (their per-pair buffers are R times a
   head's output) and merge into it in place.
Backward: with the merged statistics (the merged out and log-sum-exp: how step 1 computed O_f
and L_f does not enter), the forced links' gradients come the way step 1 ran: where it ran
"sdpa", from the same library's backward per forced group handed the merged statistics
(forced.sdpa_forced_backward: cuDNN's backward on the GPU); where it ran "triton", from the tile
kernels' backward on the forced selection. Either writes straight into the final dK, dV (head
slices) and a float32 dQ; the routed pairs add their share to them. dQ: one launch per slot r
over slot r's pairs sorted by chunk (`slot_pairs`): a query has one pair per slot, so every row
belongs to one program of a launch and is added to with a plain load and store. dK, dV: per key
block over the queries that chose its chunk (each key block is one program's). No atomics, no
per-pair gradient buffers.
The grids are sized without knowing how many tiles the chunks need (that would need the host to
read GPU counts): ceil(pairs / BLOCK_M) + C programs per (batch, head) bound them, and the spare
ones exit at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .forced import FALLBACK_REASONS, ForcedGroup, sdpa_forced_attention, sdpa_forced_backward, sdpa_forced_plan
from .selection import Selection
from .triton_attention import (_attn_bwd_dq_range, check_inputs, _attn_fwd_range, _backward, _key_block, chunk_bucket,
                               _delta, _forward, _last_dim_contiguous, kernel_plan, key_blocks)

GATHER_BLOCK = {"cuda": (64, 64, 4), "cpu": (16, 16, 1)}  # BLOCK_M, BLOCK_N, warps (CPU: the interpreter)
# Heads run in groups whose buffers stay under this many bytes (head_buffer_bytes): the forward's
# routed partial outputs (q's dtype, one per pair slot) and, with gradients, the backward's float32
# dQ. All heads at once held 15.3 GiB at MoC-180k forward + backward on the H200, against dense
# cuDNN's 6.9 (12 heads x 128, benchmarks/results/attention_gather_180k_h200.json, when the
# backward also kept a float32 dQ per pair slot and dK / dV); one head's partial outputs there take
# 0.23 GB, so two heads run at once with gradients (below). Without gradients (rendering) the
# budget is half of that, one head at a time at MoC-180k: since step 1 writes the output itself and the
# groups merge into it in place (2026-12-07), the forward's peak there was 3.61 GiB at 256 MiB,
# 3.83 at 512 MiB and 4.26 at 1 GiB (4.43 before the in-place merge; dense cuDNN 3.25), its time
# 65.8 ms each way (one H200, structured inputs, benchmarks/results/attention_fwd_budget_h200.json).
# With gradients the smaller groups cost time (forward + backward 298.8 ms at 256 MiB, 272.0 at 512,
# 268.7 at 1 GiB on the H200, when the backward also ran cuDNN's forced-link backward per group;
# it now runs once over all heads). 512 MiB since 2026-12-07 (H100, 2026-12-08: forward + backward
# at 180k 261.9 ms, 4.85x dense cuDNN; peak at 64k 1.97 GiB against dense's 2.12; benchmarks/results/
# attention_*_bwd*_h100.json): at 64k one group of
# all 12 heads held 0.93 GiB of partial outputs, the peak of forward + backward there (traced by
# benchmarks/attention_memory.py: 0.44 GiB above dense at 1 GiB, 0.19 at 512 MiB, before dense
# cuDNN's own float32 dQ accumulator of 0.37 GiB, which the trace does not see).
GATHER_BUFFER_BYTES = 1 << 29
# The backward sums the routed pairs' dQ in float32 for as many heads at a time as fit this many
# bytes (where cuDNN ran step 1: its share of dQ is already in dq, rounded as the library returns
# it, and each pass starts from it). One float32 dQ of all heads was the largest tensor of the
# backward at 64k (0.37 GiB; benchmarks/attention_memory.py).
GATHER_DQ_BYTES = 1 << 26
GATHER_FWD_BUFFER_BYTES = 1 << 28
# Without gradients a head whose partial outputs pass GATHER_FWD_PIECE_BYTES runs its queries in
# pieces that fit it (query_rows_per_piece): the same pairs and the same arithmetic, so the same
# output bit for bit, with a smaller buffer.
GATHER_FWD_PIECE_BYTES = 1 << 28
# How the forward without gradients merges the routed slots (gather_moc_attention's `merge`):
# "buffers": per head group, every slot's partial output in a buffer, then one merge kernel (the
# measured default above); "in_place": one launch per slot folding its partial results straight
# into the output (no per-pair buffer at all: the forward's peak is the output and the selection,
# as dense attention's is the output; R + 1 roundings of the output to q's dtype instead of one:
# relative error 3.5e-3 against 2.3e-3 in bf16 for the merge alone, simulated). Timed on one H100
# (2026-12-07, benchmarks/results/attention_*_inplace_h100.json), it is not the default: at 180k
# 65.6 / 66.9 ms against the buffers' 66.9 / 68.2 (structured / random, 2 % faster) but a higher
# forward peak, 3.79 GiB against 3.53 (its sorted pair tables and log-sum-exp cover all heads at
# once, where the buffers go one head at a time), and slower at 16k (3.9 against 3.2 ms structured).
# The in-place merge sorts the pairs of a group of heads at a time, so that its tables (int32 keys,
# the sort's int16 ids, int64 order and int32 queries, and the GPU radix sort's double buffers:
# about IN_PLACE_PAIR_BYTES a pair) stay under GATHER_IN_PLACE_BUFFER_BYTES: at MoC-180k two heads
# a group, at 16k all twelve. Over all heads at once they put the in-place forward's peak 0.54 GiB
# above dense cuDNN's at MoC-180k (H100, above); `python benchmarks/attention_memory.py` traces
# what each way holds at its peak.
IN_PLACE_PAIR_BYTES = 32
GATHER_IN_PLACE_BUFFER_BYTES = 1 << 26
GATHER_MERGES = ("buffers", "in_place")
GATHER_RENDER_MERGE = "buffers"
FORCED_IMPLS = ("sdpa", "triton")  # how step 1 computes the forced links (see the module docstring)
# Step 1 by default, per (device type, with gradients): "sdpa" everywhere it fits. Without
# gradients since the H200 measured the forced links alone at 42.9 ms through cuDNN against 51.8 ms
# through the tile kernel at MoC-180k (benchmarks/results/attention_forced_180k_h200.json); with
# gradients since their backward runs through cuDNN too (forced.sdpa_forced_backward): forward +
# backward at MoC-180k 280.3 against 373.4 ms (structured inputs) and 291.4 against 376.8 ms (random)
# on the H100, one run (benchmarks/results/attention_180k_sdpa_bwd_h100.json). Before that the
# backward of a cuDNN step 1 was the tile kernels', and "triton" won with gradients (439.5 against
# 447.9 ms, H200). On the CPU (the interpreter) "sdpa" runs PyTorch's CPU flash kernel.
FORCED_DEFAULT = {("cuda", False): "sdpa", ("cuda", True): "sdpa", ("cpu", False): "sdpa", ("cpu", True): "sdpa"}


def forced_default(device_type: str, grad: bool) -> str:
    """FORCED_DEFAULT's step 1 for a device type, with or without gradients ("triton" elsewhere)."""
    return FORCED_DEFAULT.get((device_type, grad), "triton")


@dataclass
class RoutedPairs:
    """The (query, slot) pairs with a routed chunk, grouped by chunk, per (batch * head)."""

    query: torch.Tensor  # (BH, P) int32 query row of each pair, chunk-major; empty slots at the end
    slot: torch.Tensor  # (BH, P) int32 the pair's slot, row * R + r (where its partial result goes)
    start: torch.Tensor  # (BH, C) int32 first pair of each chunk
    count: torch.Tensor  # (BH, C) int32 pairs of each chunk
    tile_end: torch.Tensor  # (BH, C) int32 cumulative BLOCK_M tiles up to and including each chunk


def _sorted_by(key: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """key (BH, P) integer group ids in [0, groups], `groups` meaning none (sorted last) -> (order:
    a stable argsort of each row, so pairs keep their order within a group; count and start of
    every group (BH, groups) int64). The sort runs on the narrowest integer type that holds the ids
    (a radix sort's passes grow with the key's bits), and the counts come from binary
    searches in the sorted ids, not from a scatter-add: at MoC-180k a row's 900k pairs fall into
    ~120 groups, and the scatter's colliding atomics took 1.9 ms of the forward on the H200."""
    dtype = next(t for t in (torch.int16, torch.int32, torch.int64) if groups <= torch.iinfo(t).max)
    ids, order = key.to(dtype).sort(dim=-1, stable=True)
    bounds = torch.arange(groups + 1, device=key.device, dtype=dtype).expand(key.shape[0], -1).contiguous()
    bounds = torch.searchsorted(ids, bounds)  # (BH, groups + 1): first pair of each group, then the end
    start = bounds[:, :groups]
    return order, bounds[:, 1:] - start, start


def routed_pairs(routed: torch.Tensor, num_chunks: int, block_m: int) -> RoutedPairs:
    """routed (B, H, Nq, R) int32 chunk ids (-1 empty) -> the pairs sorted by chunk, then query."""
    B, H, Nq, R = routed.shape
    C = num_chunks
    flat = routed.reshape(B * H, Nq * R)
    # slot order is query-major, so queries ascend per chunk; empty slots go to a spare chunk C
    order, counts, start = _sorted_by(torch.where(flat >= 0, flat, C), C)
    tiles = (counts + block_m - 1) // block_m
    return RoutedPairs((order // R).to(torch.int32).contiguous(), order.to(torch.int32).contiguous(),
                       start.to(torch.int32).contiguous(), counts.to(torch.int32).contiguous(),
                       tiles.cumsum(-1).to(torch.int32).contiguous())


@dataclass
class SlotPairs:
    """The same pairs sorted by (slot, chunk), queries ascending: per slot, its pairs by chunk."""

    query: torch.Tensor  # (BH, Nq * R) int32 query row of each pair, slot-major then chunk-major
    start: torch.Tensor  # (R, BH, C) int32 first pair of (slot, chunk) in `query`
    count: torch.Tensor  # (R, BH, C) int32 pairs of (slot, chunk)
    tile_end: torch.Tensor  # (R, BH, C) int32 cumulative BLOCK_M tiles within the slot, up to each chunk


def slot_pairs(routed: torch.Tensor, num_chunks: int, block_m: int) -> SlotPairs:
    """routed (B, H, Nq, R) int32 chunk ids (-1 empty) -> the pairs sorted by (slot, chunk): one
    sort for all slots; slot r's tables are `start[r]`, `count[r]`, `tile_end[r]` (contiguous).
    The sort keys are built in int32 (R * C + 1 ids), not int64: at MoC-180k each 64-bit
    temporary of all heads is 86 MB."""
    B, H, Nq, R = routed.shape
    C = num_chunks
    flat = routed.reshape(B * H, Nq * R)
    slot = torch.arange(Nq * R, device=routed.device, dtype=torch.int32) % R
    order, counts, start = _sorted_by(torch.where(flat >= 0, slot * C + flat, R * C), R * C)  # empty: last
    counts, start = (x.view(B * H, R, C).transpose(0, 1) for x in (counts, start))
    tiles = ((counts + block_m - 1) // block_m).cumsum(-1)
    return SlotPairs((order // R).to(torch.int32).contiguous(), *(x.to(torch.int32).contiguous()
                                                                  for x in (start, counts, tiles)))


def gather_work(selection: Selection, block_m: int) -> float:
    """What gather's forward walks, as a fraction of all (query, key) pairs: the forced links at
    their pairs (step 1 runs them as dense rectangles: each shot's queries against exactly their
    forced keys), plus, per routed slot and key chunk, the slot's pairs of that chunk rounded up to
    whole BLOCK_M tiles, times the chunk's keys. With block_m = 1 it is the density; over it, what
    the tiles' padding adds (benchmarks/attention.py's `work` column)."""
    layout, routed = selection.layout, selection.routed
    B, H, Nq, _ = routed.shape
    clen = layout.tensors_on(routed.device).chunk_len.to(torch.int64)
    forced = float((selection.forced.to(torch.int64) @ clen)[selection.query_chunks].sum()) * B * H
    count = slot_pairs(routed, layout.num_chunks, block_m).count.to(torch.int64)  # (R, B * H, C)
    walked = float(((count + block_m - 1) // block_m * block_m * clen).sum())
    return (forced + walked) / (B * H * Nq * selection.num_keys)


@triton.jit
def _pair_tile(t, off_hz, chunk_tile_end, chunk_pair_start, chunk_pair_count, C, P,
               C_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """Program t of (batch * head) off_hz: its chunk c (clamped), the flat indices of its up to
    BLOCK_M pairs, and which of them exist (none for a spare program past the last tile)."""
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
    return c, off_hz.to(tl.int64) * P + start + offs_m, (offs_m < count) & live


@triton.jit
def _pair_partial(Q, K, V, pair_query, chunk_pair_start, chunk_pair_count, chunk_tile_end, chunk_start, chunk_end,
                  sm_scale, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
                  stride_vn, H, C, P,
                  HEAD_DIM: tl.constexpr, C_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's up to BLOCK_M pairs of one chunk (its (batch, head)'s tile t), the chunk's keys
    walked once: (pair indices, query rows, which exist, the unnormalised partial out (BLOCK_M, D)
    float32, the row sums with 1 where no pair is, the partial log2-sum-exp)."""
    DTYPE: tl.constexpr = Q.dtype.element_ty
    t = tl.program_id(0)
    off_hz = tl.program_id(1)
    off_b = (off_hz // H).to(tl.int64)
    off_h = (off_hz % H).to(tl.int64)
    c, pair, row_valid = _pair_tile(t, off_hz, chunk_tile_end, chunk_pair_start, chunk_pair_count, C, P, C_PAD, BLOCK_M)
    rows = tl.load(pair_query + pair, mask=row_valid, other=0).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :],
                mask=row_valid[:, None], other=0.0)  # (BLOCK_M, D): gathered query rows
    lo = tl.load(chunk_start + c)
    hi = tl.load(chunk_end + c)
    hi = tl.where(tl.max(row_valid.to(tl.int32), 0) > 0, hi, lo)  # nothing to do: walk nothing
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, l_i, m_i = _attn_fwd_range(acc, l_i, m_i, q, row_valid, K + off_b * stride_kb + off_h * stride_kh,
                                    V + off_b * stride_vb + off_h * stride_vh, lo, hi, stride_kn, stride_vn,
                                    sm_scale * 1.44269504, offs_n, offs_d, BLOCK_N, DTYPE)
    l_safe = tl.where(row_valid, l_i, 1.0)
    return pair, rows, row_valid, acc, l_safe, m_i + tl.math.log2(l_safe)


@triton.jit
def _routed_fwd(Q, K, V, OP, LP, pair_query, pair_slot, chunk_pair_start, chunk_pair_count, chunk_tile_end,
                chunk_start, chunk_end, sm_scale,
                stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                H, C, P,
                HEAD_DIM: tl.constexpr, C_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: up to BLOCK_M pairs of one chunk (_pair_partial); each pair's normalised
    partial out and log2-sum-exp go to its slot."""
    pair, _rows, row_valid, acc, l_safe, lse_r = _pair_partial(
        Q, K, V, pair_query, chunk_pair_start, chunk_pair_count, chunk_tile_end, chunk_start, chunk_end, sm_scale,
        stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, H, C, P,
        HEAD_DIM, C_PAD, BLOCK_M, BLOCK_N)
    slots = tl.load(pair_slot + pair, mask=row_valid, other=0).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    out = tl.program_id(1).to(tl.int64) * P + slots
    tl.store(LP + out, lse_r, mask=row_valid)
    tl.store(OP + out[:, None] * HEAD_DIM + offs_d[None, :], (acc / l_safe[:, None]).to(Q.dtype.element_ty),
             mask=row_valid[:, None])


@triton.jit
def _routed_fwd_into(Q, K, V, OUT, LSE, pair_query, chunk_pair_start, chunk_pair_count, chunk_tile_end,
                     chunk_start, chunk_end, sm_scale,
                     stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
                     stride_vn, stride_ob, stride_oh, stride_om,
                     H, NQ, C, P,
                     HEAD_DIM: tl.constexpr, C_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One slot's routed pairs, merged straight into the output: each program computes its pairs'
    partial results (_pair_partial), then folds them into the rows' running output OUT (q's dtype,
    strided like Q) and running log-sum-exp LSE (B * H, NQ) float32. A query has at most one pair
    in a slot, so no other program of this launch touches its row."""
    _pair, rows, row_valid, acc, l_safe, lse_r = _pair_partial(
        Q, K, V, pair_query, chunk_pair_start, chunk_pair_count, chunk_tile_end, chunk_start, chunk_end, sm_scale,
        stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, H, C, P,
        HEAD_DIM, C_PAD, BLOCK_M, BLOCK_N)
    off_hz = tl.program_id(1)
    off_b = (off_hz // H).to(tl.int64)
    off_h = (off_hz % H).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    stat = off_hz.to(tl.int64) * NQ + rows
    lse_run = tl.load(LSE + stat, mask=row_valid, other=0.0)
    m = tl.maximum(lse_run, lse_r)
    w_run = tl.exp2(lse_run - m)
    w_r = tl.exp2(lse_r - m)
    total = w_run + w_r
    o_ptrs = OUT + off_b * stride_ob + off_h * stride_oh + rows[:, None] * stride_om + offs_d[None, :]
    o_run = tl.load(o_ptrs, mask=row_valid[:, None], other=0.0).to(tl.float32)
    merged = (w_run[:, None] * o_run + (w_r / l_safe)[:, None] * acc) / total[:, None]
    tl.store(o_ptrs, merged.to(OUT.dtype.element_ty), mask=row_valid[:, None])
    tl.store(LSE + stat, m + tl.math.log2(total), mask=row_valid)


@triton.jit
def _pair_rows(pair_query, pair, row_valid, LSE, DELTA, stat_base):
    rows = tl.load(pair_query + pair, mask=row_valid, other=0).to(tl.int64)
    lse = tl.load(LSE + stat_base + rows, mask=row_valid, other=float("inf"))  # +inf: p = 0 for padding
    delta = tl.load(DELTA + stat_base + rows, mask=row_valid, other=0.0)
    return rows, lse, delta


@triton.jit
def _routed_bwd_dq(Q, K, V, DO, DQA, LSE, DELTA, pair_query, chunk_pair_start, chunk_pair_count,
                   chunk_tile_end, chunk_start, chunk_end, sm_scale,
                   stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                   stride_dob, stride_doh, stride_dom,
                   H, NQ, C, P,
                   HEAD_DIM: tl.constexpr, C_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One slot's routed pairs' share of dQ, added to the float32 dQ (B * H, NQ, D) contiguous.
    A query has at most one pair in a slot, so no other program of this launch touches its row."""
    DTYPE: tl.constexpr = Q.dtype.element_ty
    t = tl.program_id(0)
    off_hz = tl.program_id(1)
    off_b = (off_hz // H).to(tl.int64)
    off_h = (off_hz % H).to(tl.int64)
    c, pair, row_valid = _pair_tile(t, off_hz, chunk_tile_end, chunk_pair_start, chunk_pair_count, C, P, C_PAD, BLOCK_M)
    rows, lse, delta = _pair_rows(pair_query, pair, row_valid, LSE, DELTA, off_hz.to(tl.int64) * NQ)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :],
                mask=row_valid[:, None], other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + rows[:, None] * stride_dom + offs_d[None, :],
                 mask=row_valid[:, None], other=0.0)
    lo = tl.load(chunk_start + c)
    hi = tl.load(chunk_end + c)
    hi = tl.where(tl.max(row_valid.to(tl.int32), 0) > 0, hi, lo)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dq = _attn_bwd_dq_range(dq, q, do, lse, delta, K + off_b * stride_kb + off_h * stride_kh,
                            V + off_b * stride_vb + off_h * stride_vh, lo, hi, stride_kn, stride_vn,
                            sm_scale * 1.44269504, offs_n, offs_d, BLOCK_N, DTYPE)
    dq_ptrs = DQA + (off_hz.to(tl.int64) * NQ + rows)[:, None] * HEAD_DIM + offs_d[None, :]
    dq_old = tl.load(dq_ptrs, mask=row_valid[:, None], other=0.0)
    tl.store(dq_ptrs, dq_old + dq * sm_scale, mask=row_valid[:, None])


@triton.jit
def _routed_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, pair_query, chunk_pair_start, chunk_pair_count,
                     kb_lo, kb_hi, kb_chunk, sm_scale,
                     stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                     stride_dob, stride_doh, stride_dom, stride_dkb, stride_dkh, stride_dkn,
                     stride_dvb, stride_dvh, stride_dvn,
                     H, NQ, C, P,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The routed pairs' share of dK, dV of one key block (inside chunk c): over the queries that
    chose c, BLOCK_M pairs at a time, added to what DK, DV hold (the forced links' share). Each key
    block is one program's alone: a plain load and store."""
    DTYPE: tl.constexpr = Q.dtype.element_ty
    pid_n = tl.program_id(0)
    off_hz = tl.program_id(1)
    off_b = (off_hz // H).to(tl.int64)
    off_h = (off_hz % H).to(tl.int64)
    c, lo, hi, offs_n, offs_d, cols64, col_ok, k, v = _key_block(
        K, V, kb_lo, kb_hi, kb_chunk, pid_n, off_b, off_h, stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn, HEAD_DIM, BLOCK_N)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    qk_scale = sm_scale * 1.44269504
    plan = off_hz.to(tl.int64) * C + c
    start = tl.load(chunk_pair_start + plan)
    count = tl.load(chunk_pair_count + plan)
    stat_base = off_hz.to(tl.int64) * NQ
    for m0 in range(0, count, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_valid = offs_m < count
        rows, lse, delta = _pair_rows(pair_query, off_hz.to(tl.int64) * P + start + offs_m, row_valid, LSE, DELTA,
                                      stat_base)
        q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :],
                    mask=row_valid[:, None], other=0.0)
        do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + rows[:, None] * stride_dom + offs_d[None, :],
                     mask=row_valid[:, None], other=0.0)
        pT = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])  # (BLOCK_N, BLOCK_M)
        dv = tl.dot(pT.to(DTYPE), do, dv)
        dsT = pT * (tl.dot(v, tl.trans(do)).to(tl.float32) - delta[None, :])
        dk = tl.dot(dsT.to(DTYPE), q, dk)
    dk_ptrs = DK + off_b * stride_dkb + off_h * stride_dkh + cols64[:, None] * stride_dkn + offs_d[None, :]
    dv_ptrs = DV + off_b * stride_dvb + off_h * stride_dvh + cols64[:, None] * stride_dvn + offs_d[None, :]
    dk_forced = tl.load(dk_ptrs, mask=col_ok[:, None], other=0.0).to(tl.float32)
    dv_forced = tl.load(dv_ptrs, mask=col_ok[:, None], other=0.0).to(tl.float32)
    tl.store(dk_ptrs, (dk_forced + dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(dv_ptrs, (dv_forced + dv).to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _merge_fwd(OF, LF, OP, LP, OUT, LOUT, stride_fb, stride_fh, stride_fn, stride_ob, stride_oh, stride_on,
               H, Nq, R: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """Step 3 for BLOCK_M query rows of one (batch, head): the forced part (O_f, L_f) and the R
    routed slots (OP, LP; a slot never written has LP = -inf and is skipped, whatever OP holds)
    weighted by their log-sum-exp (log2 units), in one pass over the partial outputs."""
    start_m = tl.program_id(0)
    off_hz = tl.program_id(1)
    off_b = (off_hz // H).to(tl.int64)
    off_h = (off_hz % H).to(tl.int64)
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Nq
    offs_d = tl.arange(0, HEAD_DIM)
    row_id = off_hz.to(tl.int64) * Nq + rows  # int64: (B * H) x Nq x R x D passes 2^31 at 180k tokens
    lse_f = tl.load(LF + row_id, mask=row_ok, other=0.0)
    m = lse_f
    for r in tl.static_range(R):
        m = tl.maximum(m, tl.load(LP + row_id * R + r, mask=row_ok, other=float("-inf")))
    w = tl.exp2(lse_f - m)
    total = w
    o_f = tl.load(OF + off_b * stride_fb + off_h * stride_fh + rows[:, None] * stride_fn + offs_d[None, :],
                  mask=row_ok[:, None], other=0.0)
    acc = w[:, None] * o_f.to(tl.float32)
    for r in tl.static_range(R):
        slot = row_id * R + r
        lse_r = tl.load(LP + slot, mask=row_ok, other=float("-inf"))
        written = lse_r > float("-inf")
        w = tl.where(written, tl.exp2(lse_r - m), 0.0)
        o_r = tl.load(OP + slot[:, None] * HEAD_DIM + offs_d[None, :], mask=(row_ok & written)[:, None], other=0.0)
        acc += w[:, None] * o_r.to(tl.float32)
        total += w
    out = acc / total[:, None]
    tl.store(OUT + off_b * stride_ob + off_h * stride_oh + rows[:, None] * stride_on + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LOUT + row_id, m + tl.log2(total), mask=row_ok)


def merge_partials(o_f: torch.Tensor, lse_f: torch.Tensor, o_r: torch.Tensor, lse_r: torch.Tensor,
                   out: torch.Tensor) -> torch.Tensor:
    """Step 3: out (B, H, Nq, D), written in place, and the merged log-sum-exp (B, H, Nq) float32
    (log2 units) from the forced part o_f (B, H, Nq, D), lse_f (B, H, Nq) and the routed slots o_r
    (B * H, Nq * R, D) contiguous, lse_r (B * H, Nq * R) float32 (-inf where a slot is empty)."""
    B, H, Nq, D = o_f.shape
    R = lse_r.shape[-1] // max(Nq, 1)
    if o_f.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("merge_partials needs o_f and out contiguous in their last dimension")
    lse_f = lse_f.contiguous()
    lse_all = torch.empty(B, H, Nq, dtype=torch.float32, device=o_f.device)
    block_m, _, warps = _blocks(o_f)
    _merge_fwd[(triton.cdiv(Nq, block_m), B * H)](
        o_f, lse_f, o_r.contiguous(), lse_r.contiguous(), out, lse_all, *o_f.stride()[:3], *out.stride()[:3],
        H, Nq, R=R, HEAD_DIM=D, BLOCK_M=block_m, num_warps=warps)
    return lse_all


def forced_only(selection: Selection) -> Selection:
    """The selection's forced links alone (no routed chunks): what step 1 computes."""
    B, H, Nq, _ = selection.routed.shape
    empty = torch.full((B, H, Nq, 1), -1, dtype=torch.int32, device=selection.routed.device)
    return Selection.build(selection.layout, selection.tile, selection.forced, empty, selection.q_offset)


def _blocks(q: torch.Tensor) -> tuple[int, int, int]:
    return GATHER_BLOCK["cuda" if q.is_cuda else "cpu"]


def forced_attention(q, k, v, selection: Selection, sm_scale: float, groups: tuple[ForcedGroup, ...] | None):
    """Step 1: (O_f (B, H, Nq, D), L_f (B, H, Nq) float32 in row order and log2 units, the forced
    selection and its kernel plan, or None, None where SDPA ran: the backward builds them). With
    `groups` (forced.sdpa_forced_plan), one SDPA call per group; without, the tile-union kernel."""
    if groups is not None:
        o_f, lse_f = sdpa_forced_attention(q, k, v, groups, sm_scale)
        return o_f, lse_f, None, None
    forced = forced_only(selection)
    o_f, lse_kernel, plan = _forward(q, k, v, forced, sm_scale)
    lse_f = torch.empty_like(lse_kernel).scatter_(-1, plan.perm.long(), lse_kernel)  # kernel order -> rows
    return o_f, lse_f, forced, plan


def _routed_merge(q, k, v, selection: Selection, sm_scale: float, out: torch.Tensor, lse_f: torch.Tensor):
    """Steps 2 and 3 for one head group: the routed pairs' partial results, merged with the forced
    part that `out` holds (a head slice of the output: read as O_f and overwritten with the whole
    attention, in place) and its log-sum-exp lse_f. Returns (the merged lse (B, H, Nq) float32,
    log2 units; the pairs, for the backward)."""
    B, H, Nq, D = q.shape
    R = selection.routed.shape[-1]
    C = selection.layout.num_chunks
    block_m, block_n, warps = _blocks(q)
    pairs = routed_pairs(selection.routed, C, block_m)
    P = Nq * R
    o_r = torch.empty(B * H, P, D, dtype=q.dtype, device=q.device)
    lse_r = torch.full((B * H, P), float("-inf"), dtype=torch.float32, device=q.device)
    lt = selection.layout.tensors_on(q.device)
    grid = (triton.cdiv(P, block_m) + C, B * H)
    _routed_fwd[grid](q, k, v, o_r, lse_r, pairs.query, pairs.slot, pairs.start, pairs.count, pairs.tile_end,
                      lt.chunk_start, lt.chunk_end, sm_scale, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                      H, C, P, HEAD_DIM=D, C_PAD=chunk_bucket(C), BLOCK_M=block_m,
                      BLOCK_N=block_n, num_warps=warps)
    # each merge program reads its rows of O_f before it writes the same rows: in place is safe
    return merge_partials(out, lse_f, o_r, lse_r, out), pairs


def _grouped_forward(q, k, v, selection: Selection, sm_scale: float, groups: tuple[ForcedGroup, ...] | None,
                     group: int, rows: int | None = None):
    """The forward: step 1 over all heads at once, straight into the output (cuDNN runs best on
    all heads, and no separate O_f is held); then steps 2 and 3 per group of `group` heads, each
    with its own per-pair buffers, merged into the output in place. Returns (out, per group (h0,
    h1, its selection, lse (B, h1 - h0, Nq) float32, pairs, forced selection, plan)); the forced
    selection and its plan are the group's own only where one group holds every head (else None:
    the backward builds them per group). `rows` (no gradients only: nothing is kept for a
    backward, and no state returned): a group's queries run in pieces of that many rows, each
    with buffers of its own size (query_rows_per_piece)."""
    H, Nq = q.shape[1], q.shape[2]
    out, lse_f, forced, plan = forced_attention(q, k, v, selection, sm_scale, groups)
    states = []
    for h0 in range(0, H, group):
        h1 = min(h0 + group, H)
        whole = (h0, h1) == (0, H)
        sel = selection if whole else selection.heads(h0, h1)
        if rows is not None and rows < Nq:
            for a in range(0, Nq, rows):  # a piece's pairs index its own rows; the keys are all of them
                b = min(a + rows, Nq)
                piece = Selection(sel.layout, sel.tile, sel.q_offset + a, sel.forced, sel.routed[:, :, a:b],
                                  forced_host=sel.forced_host)
                _routed_merge(q[:, h0:h1, a:b], k[:, h0:h1], v[:, h0:h1], piece, sm_scale, out[:, h0:h1, a:b],
                              lse_f[:, h0:h1, a:b])
            continue
        lse, pairs = _routed_merge(q[:, h0:h1], k[:, h0:h1], v[:, h0:h1], sel, sm_scale, out[:, h0:h1],
                                   lse_f[:, h0:h1])
        states.append((h0, h1, sel, lse, pairs, forced if whole else None, plan if whole else None))
    return out, states


def _in_place_forward(q, k, v, selection: Selection, sm_scale: float, groups: tuple[ForcedGroup, ...] | None):
    """The forward without gradients and without per-pair buffers: step 1 over all heads into the
    output, then per group of heads (`in_place_heads_per_group`) one launch per routed slot (its
    pairs sorted by chunk, `slot_pairs`) that folds its partial results into the output and a
    running log-sum-exp in place. Beside the output it holds the log-sum-exp (B, H, Nq) float32
    and one head group's pair tables; the output is rounded to q's dtype after each slot (R + 1
    roundings instead of one)."""
    B, H, Nq, D = q.shape
    R = selection.routed.shape[-1]
    C = selection.layout.num_chunks
    out, lse_f, _, _ = forced_attention(q, k, v, selection, sm_scale, groups)
    block_m, block_n, warps = _blocks(q)
    lt = selection.layout.tensors_on(q.device)
    group = in_place_heads_per_group(q, R)
    for h0 in range(0, H, group):
        h1 = min(h0 + group, H)
        heads = slice(h0, h1)
        sel = selection if (h0, h1) == (0, H) else selection.heads(h0, h1)
        lse = lse_f[:, heads].contiguous()  # the group's running log-sum-exp, (B * heads, Nq) for the kernel
        by_slot = slot_pairs(sel.routed, C, block_m)
        qg, kg, vg, og = q[:, heads], k[:, heads], v[:, heads], out[:, heads]  # views: strides of the whole
        for r in range(R):
            _routed_fwd_into[(triton.cdiv(Nq, block_m) + C, B * (h1 - h0))](
                qg, kg, vg, og, lse, by_slot.query, by_slot.start[r], by_slot.count[r], by_slot.tile_end[r],
                lt.chunk_start, lt.chunk_end, sm_scale, *qg.stride()[:3], *kg.stride()[:3], *vg.stride()[:3],
                *og.stride()[:3], h1 - h0, Nq, C, Nq * R, HEAD_DIM=D, C_PAD=chunk_bucket(C),
                BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
        del by_slot, lse  # before the next group's tables
    return out


class _GatherAttention(torch.autograd.Function):
    """All head groups in one autograd node: the forward writes one output, the backward one dQ,
    dK and dV (per-group nodes over head slices made autograd add a full-size gradient per group)."""

    @staticmethod
    def forward(ctx, q, k, v, selection: Selection, sm_scale: float, groups: tuple[ForcedGroup, ...] | None,
                group: int):
        out, states = _grouped_forward(q, k, v, selection, sm_scale, groups, group)
        ctx.save_for_backward(q, k, v, out)
        ctx.states, ctx.sm_scale, ctx.groups = states, sm_scale, groups
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out = ctx.saved_tensors
        do = _last_dim_contiguous(do)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        if ctx.groups is not None:
            # the forced links through cuDNN once over all heads (as step 1 ran; per head group the
            # library ran slower), from the whole attention's statistics, straight into dq, dk, dv
            lse = torch.cat([state[3] for state in ctx.states], dim=1) if len(ctx.states) > 1 else ctx.states[0][3]
            sdpa_forced_backward(q, k, v, out, lse, do, ctx.groups, ctx.sm_scale, dq, dk, dv)
            del lse
        for h0, h1, selection, lse, pairs, forced, plan in ctx.states:
            heads = slice(h0, h1)
            _group_backward(q[:, heads], k[:, heads], v[:, heads], out[:, heads], lse, do[:, heads], selection,
                            pairs, forced, plan, ctx.groups, ctx.sm_scale, dq[:, heads], dk[:, heads], dv[:, heads])
        return dq, dk, dv, None, None, None, None


def _group_backward(q, k, v, out, lse, do, selection: Selection, pairs: RoutedPairs, forced, plan,
                    groups: tuple[ForcedGroup, ...] | None, sm_scale: float, dq, dk, dv) -> None:
    """Adds the routed pairs' dQ, dK, dV of one head group to dq, dk, dv (head slices of the full
    gradients, in q's dtype): q, k, v, out, do head slices (any strides), lse (B, H, Nq) float32 as
    the group's forward made it (contiguous: the kernels index it by batch x head). The forced
    links' share: with `groups` (SDPA ran step 1) dq, dk, dv already hold it (the caller ran it
    over all heads); else the tile kernels' backward writes it here first. dQ is summed in float32:
    with `groups`, per pass of heads whose float32 dQ fits GATHER_DQ_BYTES (dq_heads_per_pass),
    starting from the forced share as the library rounded it (exact in float32: the same sums as
    one buffer for the group); else in one float32 dQ of the group (the tile kernels' share unrounded)."""
    B, H, Nq, D = q.shape
    R = selection.routed.shape[-1]
    C = selection.layout.num_chunks
    delta = _delta(out, do)
    dq_acc = None
    if groups is None:
        dq_acc = torch.empty(B, H, Nq, D, dtype=torch.float32, device=q.device)
        if plan is None:
            forced = forced_only(selection)
            plan = kernel_plan(forced)
        _backward(q, k, v, do, lse.gather(-1, plan.perm.long()), delta, forced, plan, sm_scale,
                  out=(dq_acc, dk, dv))
    # routed pairs: dQ one slot at a time (each launch owns its rows), dK / dV per key block over
    # the queries that chose its chunk, both added to the forced links' share
    block_m, block_n, warps = _blocks(q)
    lt = selection.layout.tensors_on(q.device)
    per_pass = H if dq_acc is not None else dq_heads_per_pass(q)
    for a in range(0, H, per_pass):
        b = min(a + per_pass, H)
        heads = slice(a, b)
        if dq_acc is not None:
            acc, routed, lse_h, delta_h = dq_acc, selection.routed, lse, delta
        else:
            acc = torch.empty(B, b - a, Nq, D, dtype=torch.float32, device=q.device).copy_(dq[:, heads])
            routed = selection.routed[:, heads]
            lse_h, delta_h = lse[:, heads].contiguous(), delta[:, heads].contiguous()
        by_slot = slot_pairs(routed, C, block_m)
        qh, kh, vh, doh = q[:, heads], k[:, heads], v[:, heads], do[:, heads]
        for r in range(R):
            _routed_bwd_dq[(triton.cdiv(Nq, block_m) + C, B * (b - a))](
                qh, kh, vh, doh, acc, lse_h, delta_h, by_slot.query, by_slot.start[r], by_slot.count[r],
                by_slot.tile_end[r], lt.chunk_start, lt.chunk_end, sm_scale, *qh.stride()[:3], *kh.stride()[:3],
                *vh.stride()[:3], *doh.stride()[:3], b - a, Nq, C, Nq * R, HEAD_DIM=D, C_PAD=chunk_bucket(C),
                BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
        del by_slot
        if dq_acc is None:
            dq[:, heads].copy_(acc)
            del acc
    kb_lo, kb_hi, kb_chunk = key_blocks(selection, block_n, q.device)
    _routed_bwd_dkdv[(kb_lo.numel(), B * H)](
        q, k, v, do, dk, dv, lse, delta, pairs.query, pairs.start, pairs.count, kb_lo, kb_hi, kb_chunk,
        sm_scale, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3],
        *dv.stride()[:3], H, Nq, C, Nq * R, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    if dq_acc is not None:
        dq.copy_(dq_acc)


def dq_heads_per_pass(q: torch.Tensor) -> int:
    """How many heads' routed dQ are summed at once in float32 under GATHER_DQ_BYTES (at least one)."""
    B, H, Nq, D = q.shape
    return max(1, min(H, GATHER_DQ_BYTES // (B * Nq * D * 4)))


def gather_moc_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selection: Selection,
                         scale: float | None = None, forced: str | None = None,
                         merge: str | None = None) -> torch.Tensor:
    """Block-sparse attention of q (B, H, Nq, D) over k, v (B, H, N, D) restricted to `selection`,
    its routed part computed per key chunk over the queries that chose it; differentiable.
    `forced`: how the forced links are computed, "sdpa" (dense calls per forced group, where exact
    and available, else "triton") or "triton" (the tile kernel); what ran and why is recorded in
    selection.info["forced"] / ["forced_reason"]; None: FORCED_DEFAULT for q's device and whether
    gradients are needed. `merge`: how the forward without gradients merges the routed slots
    (GATHER_MERGES; None: GATHER_RENDER_MERGE); with gradients it is always "buffers" (the
    backward reads the pairs sorted by chunk). Returns (B, H, Nq, D) in q's dtype."""
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    forced = forced_default(q.device.type, grad) if forced is None else forced
    if forced not in FORCED_IMPLS:
        raise ValueError(f"forced must be one of {FORCED_IMPLS}, got {forced!r}")
    merge = GATHER_RENDER_MERGE if merge is None else merge
    if merge not in GATHER_MERGES:
        raise ValueError(f"merge must be one of {GATHER_MERGES}, got {merge!r}")
    check_inputs(q, k, v, selection, "gather")
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    sm_scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    groups, why = sdpa_forced_plan(q, selection) if forced == "sdpa" else (None, "requested")
    selection.info["forced"] = "triton" if groups is None else "sdpa"
    selection.info["forced_reason"] = (FALLBACK_REASONS[why] if groups is None
                                       else f"one SDPA call per forced group ({len(groups)})")
    # heads in groups, each with its own buffers (views of q, k, v: no copies in), into one output
    group = heads_per_group(q, selection.routed.shape[-1], grad)
    if grad:
        return _GatherAttention.apply(q, k, v, selection, sm_scale, groups, group)
    selection.info["merge"] = merge
    if merge == "in_place":
        return _in_place_forward(q, k, v, selection, sm_scale, groups)
    rows = query_rows_per_piece(q, selection.routed.shape[-1])
    if rows < q.shape[2]:  # one head's buffers pass the piece budget: one head at a time, in pieces
        group = 1
    return _grouped_forward(q, k, v, selection, sm_scale, groups, group, rows=rows)[0]


def head_buffer_bytes(q: torch.Tensor, slots: int, grad: bool) -> int:
    """One head's buffers beside the inputs and outputs: the forward's routed partial outputs (q's
    dtype, one per pair slot), and with `grad` the backward's float32 dQ (they never coexist:
    the larger counts)."""
    B, _, Nq, D = q.shape
    partials = B * Nq * slots * D * q.element_size()
    return max(partials, B * Nq * D * 4) if grad else partials


def query_rows_per_piece(q: torch.Tensor, slots: int) -> int:
    """Query rows whose partial outputs (one per slot, q's dtype) fit GATHER_FWD_PIECE_BYTES, for
    the forward without gradients: one head's queries run in pieces of this many rows where its
    buffers would pass that budget (at least BLOCK_M rows; all of them where they fit)."""
    B, _, Nq, D = q.shape
    per_row = B * slots * D * q.element_size()
    if Nq * per_row <= GATHER_FWD_PIECE_BYTES:
        return Nq
    return max(_blocks(q)[0], GATHER_FWD_PIECE_BYTES // per_row)


def in_place_head_bytes(q: torch.Tensor, slots: int) -> int:
    """One head's share of the in-place merge's peak: its pairs' tables while they are sorted
    (IN_PLACE_PAIR_BYTES a pair, the GPU sort's workspace included)."""
    B, _, Nq, _ = q.shape
    return B * Nq * slots * IN_PLACE_PAIR_BYTES


def in_place_heads_per_group(q: torch.Tensor, slots: int) -> int:
    """How many heads the in-place merge sorts and runs at once, so that their pair tables stay
    under GATHER_IN_PLACE_BUFFER_BYTES (at least one)."""
    return max(1, min(q.shape[1], GATHER_IN_PLACE_BUFFER_BYTES // in_place_head_bytes(q, slots)))


def heads_per_group(q: torch.Tensor, slots: int, grad: bool) -> int:
    """How many heads run at once so that one group's buffers stay under GATHER_BUFFER_BYTES, or
    GATHER_FWD_BUFFER_BYTES without gradients (at least one)."""
    budget = GATHER_BUFFER_BYTES if grad else GATHER_FWD_BUFFER_BYTES
    return max(1, min(q.shape[1], budget // head_buffer_bytes(q, slots, grad)))


__all__ = ["FORCED_DEFAULT", "FORCED_IMPLS", "GATHER_BUFFER_BYTES", "GATHER_DQ_BYTES", "GATHER_FWD_BUFFER_BYTES",
           "GATHER_FWD_PIECE_BYTES", "GATHER_IN_PLACE_BUFFER_BYTES", "GATHER_MERGES", "GATHER_RENDER_MERGE",
           "IN_PLACE_PAIR_BYTES", "RoutedPairs", "SlotPairs", "dq_heads_per_pass", "forced_attention",
           "forced_default", "forced_only", "gather_moc_attention", "gather_work", "head_buffer_bytes", "heads_per_group",
           "in_place_head_bytes", "in_place_heads_per_group", "merge_partials", "query_rows_per_piece",
           "routed_pairs", "slot_pairs"]
