"""MoC attention on the CPU at its density: the forced blocks dense, the routed chunks gathered.

For: `chunked_moc_attention(q, k, v, selection)`, exact MoC attention whose work follows the
selection instead of the whole (query, key) matrix, for CPUs (where "auto" picks it at story
sizes). Two parts, merged by their log-sum-exp:
  1. forced links: query tokens whose chunks share one forced row (with the "shot" anchor, every
     frame of a shot: its own shot and captions) attend those keys as one dense block;
  2. routed links: per key chunk, the (batch x head) rows of the queries that routed to it are
     gathered (padded to the longest row) and attend the chunk's keys in one batched matmul;
     each query meets a chunk at most once, so the running softmax merges without collisions.
Forced and routed links are disjoint (routing.candidate_links), so nothing is counted twice.
Computes in float32; autograd flows through it (tests compare values and gradients with the
reference). Not for: GPUs (triton_attention.py), the specification (attention.reference_attention).
"""

from __future__ import annotations

import torch

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
    qchunk = selection.query_chunks.long()  # (Nq,)

    # 1. forced: one dense block per distinct forced row (found among the chunks, not the tokens)
    present = torch.unique(qchunk)
    rows, inverse = torch.unique(selection.forced[present], dim=0, return_inverse=True)  # (G, C)
    group_of = torch.full((selection.layout.num_chunks,), -1, dtype=torch.long, device=q.device)
    group_of[present] = inverse
    group = group_of[qchunk]  # (Nq,)
    lse_f = torch.empty(BH, Nq, device=q.device)
    o_f = torch.empty(BH, Nq, D, device=q.device)
    for g in range(rows.shape[0]):
        tokens = (group == g).nonzero().squeeze(1)
        keys = rows[g][lt.token_chunk].nonzero().squeeze(1)
        kk, vv = kf[:, keys], vf[:, keys]
        for a in range(0, tokens.numel(), FORCED_BLOCK):
            t = tokens[a:a + FORCED_BLOCK]
            o_f[:, t], lse_f[:, t] = _attend(qf[:, t], kk, vv, scale)

    # 2. routed: per key chunk, the rows that chose it, padded into one batched call
    routed = selection.routed.reshape(BH, Nq, -1).long()  # (BH, Nq, R), -1 empty
    lse_r = torch.full((BH, Nq), float("-inf"), device=q.device)
    o_r = torch.zeros(BH, Nq, D, device=q.device)
    starts, ends = lt.chunk_start.tolist(), lt.chunk_end.tolist()
    for c in torch.unique(routed[routed >= 0]).tolist():
        chose = (routed == c).any(-1)  # (BH, Nq): a query routes to a chunk at most once
        count = chose.sum(-1)  # (BH,)
        width = int(count.max())
        order = torch.argsort((~chose).to(torch.int8), dim=-1, stable=True)[:, :width]  # choosers first
        valid = torch.arange(width, device=q.device)[None, :] < count[:, None]  # (BH, width)
        qs = qf.gather(1, order[..., None].expand(-1, -1, D))  # (BH, width, D)
        o, lse = _attend(qs, kf[:, starts[c]:ends[c]], vf[:, starts[c]:ends[c]], scale)
        bh, j = valid.nonzero(as_tuple=True)
        t = order[bh, j]
        old, add = lse_r[bh, t], lse[bh, j]
        new = torch.logaddexp(old, add)
        # in place: the reads above are copies, so autograd keeps what it needs
        o_r.index_put_((bh, t), o_r[bh, t] * torch.exp(old - new)[:, None] + o[bh, j] * torch.exp(add - new)[:, None])
        lse_r.index_put_((bh, t), new)

    # merge: every query has its own chunk forced, so lse_f is finite
    lse = torch.logaddexp(lse_f, lse_r)
    out = o_f * torch.exp(lse_f - lse)[..., None] + o_r * torch.exp(lse_r - lse)[..., None]
    return out.reshape(B, H, Nq, D).to(q.dtype)


__all__ = ["chunked_moc_attention"]
