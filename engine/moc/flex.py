"""FlexAttention backend: a BlockMask built from the Selection, plus a mask_mod for exactness.

For: the GPU peer of the Triton kernel and a second oracle. Per 128-query block, the key blocks
of the union of the tile's chunks become the BlockMask's KV lists; blocks wholly inside chunks
that every token of the tile attends are "full" (no mask_mod), the rest are partial and the
mask_mod looks each (query, key) pair up in the selection's per-token chunk bitsets.
Not for: routing, or CPU speed (on the CPU FlexAttention runs its unfused path; use it for tests).
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .selection import Selection

BLOCK = 128  # FlexAttention's block size; the selection's tile must equal it


def block_overlap(selection: Selection, n_blocks: int) -> torch.Tensor:
    """(C, KB) float32: tokens of chunk c inside key block kb."""
    lt = selection.layout.tensors_on(selection.routed.device)
    starts = torch.arange(n_blocks, device=lt.chunk_start.device) * BLOCK
    lo = torch.maximum(lt.chunk_start[:, None], starts[None, :])
    hi = torch.minimum(lt.chunk_end[:, None], (starts + BLOCK).clamp(max=selection.num_keys)[None, :])
    return (hi - lo).clamp(min=0).to(torch.float32)


def build_block_mask(selection: Selection) -> BlockMask:
    if selection.tile != BLOCK:
        raise ValueError(f"the flex backend needs MoCConfig.tile == {BLOCK}, got {selection.tile}")
    B, H, Nq = selection.shape
    N = selection.num_keys
    C = selection.layout.num_chunks
    device = selection.routed.device
    KB = -(-N // BLOCK)
    overlap = block_overlap(selection, KB)  # (C, KB)
    block_len = overlap.sum(0)  # (KB,) real keys per block
    # scatter the compact tile lists back to (B, H, T, C) indicator masks
    ids = selection.tile_chunks.long()
    union = torch.zeros(*ids.shape[:-1], C + 1, device=device)
    union.scatter_(-1, torch.where(ids >= 0, ids, C), 1.0)
    full = torch.zeros_like(union)
    full.scatter_(-1, torch.where(ids >= 0, ids, C), selection.tile_full.float())
    union, full = union[..., :C], full[..., :C]
    any_block = (union @ overlap) > 0  # (B, H, T, KB) tile needs this key block
    full_block = (full @ overlap) >= block_len  # every key of the block is in a full chunk
    partial_block = any_block & ~full_block

    def to_lists(m: torch.Tensor):
        count = m.sum(-1, dtype=torch.int32)
        order = torch.where(m, torch.arange(KB, device=device), KB + torch.arange(KB, device=device)).argsort(-1)
        return count, order.to(torch.int32)

    kv_num, kv_idx = to_lists(partial_block)
    full_num, full_idx = to_lists(full_block)

    bits = selection.token_bits()  # (B, H, Nq, W)
    token_chunk = selection.layout.tensors_on(device).token_chunk.to(torch.int32)
    # pad lookups to whole blocks: flex may evaluate the mask past the last token
    bits = torch.nn.functional.pad(bits, (0, 0, 0, -(-Nq // BLOCK) * BLOCK - Nq))
    token_chunk = torch.nn.functional.pad(token_chunk, (0, KB * BLOCK - N))

    def mask_mod(b, h, q_idx, kv_idx):
        kc = token_chunk[kv_idx]
        word = bits[b, h, q_idx, kc // 32]
        return ((word >> (kc % 32)) & 1) == 1

    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(BLOCK, BLOCK),
                                    mask_mod=mask_mod, seq_lengths=(Nq, N))


def flex_moc_attention(q, k, v, selection: Selection, scale: float | None = None,
                       block_mask: BlockMask | None = None) -> torch.Tensor:
    block_mask = build_block_mask(selection) if block_mask is None else block_mask
    if q.device.type == "cuda":
        return compiled_flex()(q, k, v, block_mask=block_mask, scale=scale)
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale)


@functools.cache
def compiled_flex():
    """torch.compile'd flex_attention, built on first GPU use (never at import)."""
    return torch.compile(flex_attention, dynamic=False)
