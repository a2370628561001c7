"""MoC attention on the CPU at its density: the forced blocks dense, the routed chunks gathered.

For: `chunked_moc_attention(q, k, v, selection)`, exact MoC attention whose work follows the
selection instead of the whole (query, key) matrix, for CPUs (where "auto" picks it at story
sizes). Two parts, merged by their log-sum-exp:
  1. forced links: query tokens whose chunks share one forced row (with the "shot" anchor, every
     frame of a shot: its own shot and captions) attend those keys as one dense block (the groups
     of forced.py, which gather's step 1 also uses);
  2. routed links: per key chunk, the (batch x head) rows of the queries that routed to it are
     gathered (padded to the longest row) and attend the chunk's keys in one batched call; the
     query lists of all chunks come from one sort, and each (query, routed slot) keeps its own
     partial result, merged with the forced part by one log-sum-exp at the end.
Forced and routed links are disjoint (routing.candidate_links), so nothing is counted twice.
Computes in float32; autograd flows through it (tests compare values and gradients with the
reference). Not for: GPUs (triton_attention.py), the specification (attention.reference_attention).
"""

from __future__ import annotations

import torch

from .forced import forced_groups
from .selection import Selection

FORCED_BLOCK = 1024  # query rows per forced-block call (bounds its (rows x keys) score buffer)
_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(q k^T * scale) v, logsumexp of the scaled scores) for (BH, n, D) float32 inputs.
    Without gradients: PyTorch's CPU flash kernel, which returns the log-sum-exp (2-3x faster
    than the matmuls below); with them, plain ops, since that kernel's log-sum-exp carries no
    gradient and the merge needs one."""
    if _FLASH is not None and q.device.type == "cpu" and not (torch.is_grad_enabled() and (
            q.requires_grad or k.requires_grad or v.requires_grad)):
        o, lse = _FLASH(q[:, None], k[:, None], v[:, None], scale=scale)
        return o[:, 0], lse[:, 0]
    s = (q @ k.transpose(1, 2)) * scale
    lse = torch.logsumexp(s, -1)
    return torch.exp(s - lse[..., None]) @ v, lse


def chunked_moc_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selection: Selection,
                          scale: float | None = None) -> torch.Tensor:
    B, H, Nq, D = q.shape
    N = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    BH = B * H
    qf, kf, vf = q.reshape(BH, Nq, D).float(), k.reshape(BH, N, D).float(), v.reshape(BH, N, D).float()
    lt = selection.layout.tensors_on(q.device)

    # 1. forced: one dense block per group of query chunks sharing a forced row (forced.py)
    blocks = forced_groups(selection)
    if blocks is None:
        raise ValueError("chunked MoC attention needs the forced links on the host (Selection.forced_host)")
    lse_f = torch.empty(BH, Nq, device=q.device)
    o_f = torch.empty(BH, Nq, D, device=q.device)
    for g in blocks:
        kk = torch.cat([kf[:, a:b] for a, b in g.keys], 1)
        vv = torch.cat([vf[:, a:b] for a, b in g.keys], 1)
        for start, end in g.queries:
            for a in range(start, end, FORCED_BLOCK):
                t = slice(a, min(a + FORCED_BLOCK, end))
                o_f[:, t], lse_f[:, t] = _attend(qf[:, t], kk, vv, scale)

    # 2. routed: per key chunk, the (batch x head) rows of the queries that chose it, padded into
    # one batched call. The query lists of every chunk come from one sort of all routed entries,
    # and each entry's partial result lands in its own slot (a query meets a chunk at most once),
    # so nothing is read back and merged per chunk: one log-sum-exp over the slots at the end.
    R = selection.routed.shape[-1]
    routed = selection.routed.reshape(BH * Nq * R).long()  # entry e = (bh, query, slot)
    entries = (routed >= 0).nonzero().squeeze(1)
    chunk = routed[entries]
    row = entries // R  # bh * Nq + query
    bh = row // Nq
    order = torch.argsort(chunk * BH + bh, stable=True)  # grouped by (chunk, bh)
    entries, chunk, row, bh = entries[order], chunk[order], row[order], bh[order]
    groups = torch.bincount(chunk * BH + bh, minlength=lt.chunk_start.numel() * BH)  # entries per (chunk, bh)
    first = torch.cumsum(groups, 0) - groups
    rank = torch.arange(entries.numel(), device=q.device) - first[chunk * BH + bh]  # place within (chunk, bh)
    per_chunk = torch.bincount(chunk, minlength=lt.chunk_start.numel()).tolist()
    widths = groups.view(-1, BH).amax(1).tolist()
    starts, ends = lt.chunk_start.tolist(), lt.chunk_end.tolist()
    q_rows = qf.reshape(BH * Nq, D)
    outs, lses, a = [], [], 0
    for c, n in enumerate(per_chunk):
        if n == 0:
            continue
        e = slice(a, a + n)
        a += n
        width = widths[c]
        at = bh[e] * width + rank[e]  # each entry's place in the padded (BH, width) call
        pick = torch.zeros(BH * width, dtype=torch.long, device=q.device)  # padding rows: query 0
        pick[at] = row[e]
        o, lse = _attend(q_rows[pick].view(BH, width, D), kf[:, starts[c]:ends[c]], vf[:, starts[c]:ends[c]], scale)
        outs.append(o.reshape(BH * width, D)[at])
        lses.append(lse.reshape(BH * width)[at])

    # merge: every query has its own chunk forced, so lse_f is finite
    lse_slot = torch.full((BH * Nq * R,), float("-inf"), device=q.device, dtype=qf.dtype)
    if lses:
        lse_e = torch.cat(lses)
        lse_slot = lse_slot.index_put((entries,), lse_e)
    lse = torch.logaddexp(lse_f, torch.logsumexp(lse_slot.view(BH, Nq, R), -1))  # (BH, Nq)
    out = (o_f * torch.exp(lse_f - lse)[..., None]).reshape(BH * Nq, D)
    if outs:
        weight = torch.exp(lse_e - lse.reshape(-1)[row])  # each routed part's share of its query
        out = out.index_add(0, row, torch.cat(outs) * weight[:, None])
    return out.reshape(B, H, Nq, D).to(q.dtype)


__all__ = ["chunked_moc_attention"]
