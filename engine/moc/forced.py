"""The forced links as a few dense blocks: groups of query rows that share one forced key set.

For: step 1 of backend "gather" (triton_gather.py) with forced="sdpa". Every query chunk has one
forced row (its own chunk, its shot with the shot anchor, the captions with the text anchor, pinned
shots); the query chunks with the same row form a group, and a group's queries attend exactly its
key set, densely. With the shot anchor that is one group per shot (its frames and its caption,
over its video and caption tokens plus the global caption) and one for the global caption. Each
group is one SDPA call that also returns the log-sum-exp (cuDNN on CUDA, PyTorch's CPU flash
kernel on the CPU), so the caller can merge it with the routed part.
Backward (`sdpa_forced_backward`): the same groups through the same library's backward (cuDNN's on
CUDA, the CPU flash kernel's backward here), given the *merged* out and log-sum-exp of the whole
attention instead of the group's own. A block's gradients need only the rows' final statistics:
with P = exp(S - L) over the block's keys and delta = rowsum(dO * O) from the merged O and L, dV =
P^T dO, dS = P * (dO V^T - delta), dQ = dS K, dK = dS^T Q are exactly that block's share of the
whole attention's gradients, which is what a dense backward computes when handed (O, L).
Not for: the routed links.

The groups come from the layout and the host copy of the forced links (Selection.forced_host),
both known on the host: planning reads nothing back from the GPU. When they are not usable
(`sdpa_forced_plan` says why) the caller runs the tile kernel instead.

Shapes: B batch, H heads, Nq queries (layout tokens [q_offset, q_offset + Nq)), N keys, D head dim.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .selection import Selection

LOG2E = 1.0 / math.log(2.0)  # natural log -> log2 units (the gather merge works in log2)
# More groups than this (anchor "chunk" or "window": one group per chunk) make many small,
# launch-bound calls; the tile kernel walks such a block diagonal in one launch instead.
FORCED_SDPA_MAX_GROUPS = 32
CUDNN_DTYPES = (torch.float16, torch.bfloat16)  # what cuDNN's SDPA takes (fp32 goes to the tile kernel)
CUDNN_MAX_HEAD_DIM = 128  # cuDNN SDPA: head dims in multiples of 8 up to this
CPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # _scaled_dot_product_flash_attention_for_cpu

FALLBACK_REASONS = {  # why step 1 ran the tile kernel, as recorded in selection.info["forced_reason"]
    "requested": "forced='triton' requested",
    "host": "the selection's forced links are on the GPU only (no forced_host): grouping them would "
            "synchronise with the GPU",
    "groups": "more forced groups than FORCED_SDPA_MAX_GROUPS (a per-chunk anchor): small launch-bound calls",
    "shape": "dtype or head dim outside cuDNN SDPA's (fp16/bf16, head dim a multiple of 8 up to 128)",
    "cudnn": "cuDNN SDPA is unavailable here (no cuDNN, disabled, or a GPU older than sm80)",
}


@dataclass(frozen=True)
class ForcedGroup:
    """Query rows that share one forced key set; both as sorted, disjoint [start, end) ranges."""

    queries: tuple[tuple[int, int], ...]  # ranges of query rows (0 = layout token q_offset)
    keys: tuple[tuple[int, int], ...]  # ranges of key tokens (layout positions)

    @property
    def num_keys(self) -> int:
        return sum(b - a for a, b in self.keys)


def _runs(ranges: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Sorted [start, end) ranges with touching neighbours merged."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return tuple(out)


def forced_groups(selection: Selection) -> tuple[ForcedGroup, ...] | None:
    """The selection's forced links as groups (ascending by first query row), or None when the
    forced links are not on the host. Computed once per layout, query range and forced matrix."""
    forced = selection.forced_host
    if forced is None:
        return None
    Nq = selection.routed.shape[2]
    key = ("forced_groups", selection.q_offset, Nq, forced.shape, forced.numpy().tobytes())
    return selection.layout.memo(key, lambda: _forced_groups(selection.layout, forced, selection.q_offset, Nq))


def _forced_groups(layout, forced: torch.Tensor, q_offset: int, Nq: int) -> tuple[ForcedGroup, ...]:
    chunks = layout.chunks  # (start, end, shot, frame, is_text) per chunk
    token_chunk = layout.tensors.token_chunk
    first, last = int(token_chunk[q_offset]), int(token_chunk[q_offset + Nq - 1])
    rows: dict[tuple[int, ...], list[int]] = {}  # forced key chunks -> the query chunks with that row
    for c in range(first, last + 1):
        rows.setdefault(tuple(forced[c].nonzero().squeeze(1).tolist()), []).append(c)
    groups = []
    for key_chunks, query_chunks in rows.items():
        queries = [(max(chunks[c][0], q_offset) - q_offset, min(chunks[c][1], q_offset + Nq) - q_offset)
                   for c in query_chunks]
        keys = [(chunks[c][0], chunks[c][1]) for c in key_chunks]
        groups.append(ForcedGroup(_runs(queries), _runs(keys)))
    return tuple(sorted(groups, key=lambda g: g.queries[0]))


def sdpa_forced_plan(q: torch.Tensor, selection: Selection) -> tuple[tuple[ForcedGroup, ...] | None, str]:
    """(the forced groups, "sdpa") when step 1 can run as SDPA calls exactly and usefully, else
    (None, a key of FALLBACK_REASONS)."""
    if q.is_cuda:
        if q.dtype not in CUDNN_DTYPES or q.shape[-1] % 8 or q.shape[-1] > CUDNN_MAX_HEAD_DIM:
            return None, "shape"
        if not (torch.backends.cudnn.is_available() and torch.backends.cuda.cudnn_sdp_enabled()
                and torch.cuda.get_device_capability(q.device) >= (8, 0)):
            return None, "cudnn"
    elif q.dtype not in CPU_DTYPES:
        return None, "shape"
    groups = forced_groups(selection)
    if groups is None:
        return None, "host"
    if len(groups) > FORCED_SDPA_MAX_GROUPS:
        return None, "groups"
    return groups, "sdpa"


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(q k^T * scale) v in q's dtype, its natural-log log-sum-exp (B, H, n) float32) for
    q (B, H, n, D) and k, v (B, H, m, D) with any strides whose last dim is contiguous."""
    B, H, n, _ = q.shape
    if q.is_cuda:
        # (q, k, v, attn_bias, compute_log_sumexp, dropout_p, is_causal, return_debug_mask, *, scale)
        out, lse, *_ = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, False, False, scale=scale)
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)
    return out, lse.reshape(B, H, n)  # cuDNN versions differ: (B, H, n) or (B, H, n, 1)


@functools.cache
def _cudnn_extras(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(philox seed, philox offset, log-sum-exp rank) as cuDNN's SDPA forward returns them on
    `device`: its backward takes the forward's dropout state (unused at dropout 0) and its
    log-sum-exp in the forward's shape, (B, H, n) or (B, H, n, 1) by cuDNN version. One tiny
    forward per device and process."""
    x = torch.zeros(1, 1, 8, 64, dtype=torch.bfloat16, device=device)
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(x, x, x, None, True, 0.0, False, False)
    return res[6], res[7], res[1].dim()


def attention_backward_with_lse(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                out: torch.Tensor, lse: torch.Tensor,
                                scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of the block softmax(q k^T * scale) v within a larger attention whose rows have
    output `out` (B, H, n, D) and natural-log log-sum-exp `lse` (B, H, n) float32 over all their
    keys: the block's share of that attention's gradients. q, do, out (B, H, n, D) and k, v
    (B, H, m, D) with a contiguous last dim; do must have out's strides (cuDNN's requirement)."""
    n = q.shape[2]
    lse = lse.contiguous()
    if q.is_cuda:
        seed, offset, rank = _cudnn_extras(q.device)
        stats = lse.unsqueeze(-1) if rank == 4 else lse
        # (grad_out, q, k, v, out, logsumexp, philox_seed, philox_offset, attn_bias, cum_seq_q,
        #  cum_seq_k, max_q, max_k, dropout_p, is_causal, *, scale)
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            do, q, k, v, out, stats, seed, offset, None, None, None, n, k.shape[2], 0.0, False, scale=scale)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        do, q, k, v, out, lse, 0.0, False, scale=scale)


def _take(x: torch.Tensor, ranges: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """x[:, :, ranges] along the token dim: a view for one range, one copy for several."""
    if len(ranges) == 1:
        a, b = ranges[0]
        return x[:, :, a:b]
    return torch.cat([x[:, :, a:b] for a, b in ranges], dim=2)


def sdpa_forced_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: tuple[ForcedGroup, ...],
                          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The forced links' attention: (out (B, H, Nq, D) in q's dtype, log-sum-exp (B, H, Nq) float32
    in log2 units, the gather kernels' convention), one SDPA call per query range of each group."""
    B, H, Nq, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(B, H, Nq, dtype=torch.float32, device=q.device)
    for group in groups:
        kg, vg = _take(k, group.keys), _take(v, group.keys)  # (B, H, keys of the group, D)
        for a, b in group.queries:
            out_g, lse_g = attention_with_lse(q[:, :, a:b], kg, vg, scale)
            out[:, :, a:b] = out_g
            lse[:, :, a:b] = lse_g * LOG2E
            del out_g, lse_g  # before the next call allocates its own (66 MiB a shot at MoC-180k)
        del kg, vg
    return out, lse


def sdpa_forced_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                         do: torch.Tensor, groups: tuple[ForcedGroup, ...], scale: float,
                         dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> None:
    """The forced links' share of the gradients, one library backward per query range of each
    group, from the whole attention's out and log-sum-exp `lse` (B, H, Nq) float32 in log2 units
    (the gather kernels' convention). Writes every row of dq (B, H, Nq, D) (the groups' query
    ranges cover every row once) and sets dk, dv (B, H, N, D) to the forced share: zero where no
    group reads a key, summed over the groups that share one (the captions)."""
    if do.stride() != out.stride():
        do = torch.empty_like(out).copy_(do)  # cuDNN's backward takes do in out's layout
    lse_nat = lse * (1.0 / LOG2E)
    dk.zero_()
    dv.zero_()
    for group in groups:
        kg, vg = _take(k, group.keys), _take(v, group.keys)
        for a, b in group.queries:
            dq_g, dk_g, dv_g = attention_backward_with_lse(do[:, :, a:b], q[:, :, a:b], kg, vg, out[:, :, a:b],
                                                           lse_nat[:, :, a:b], scale)
            dq[:, :, a:b] = dq_g
            at = 0
            for ka, kb in group.keys:
                dk[:, :, ka:kb] += dk_g[:, :, at:at + kb - ka]
                dv[:, :, ka:kb] += dv_g[:, :, at:at + kb - ka]
                at += kb - ka


__all__ = ["FALLBACK_REASONS", "FORCED_SDPA_MAX_GROUPS", "ForcedGroup", "attention_backward_with_lse",
           "attention_with_lse", "forced_groups", "sdpa_forced_attention", "sdpa_forced_backward",
           "sdpa_forced_plan"]
