"""The Selection: MoC sparsity as data, produced once by routing and consumed by every backend.

For: holding, per query token and head, the chunks it routed to (plus the layout's forced links),
and per query tile the union of chunks its tokens need, flagged full (every token of the tile
attends the chunk) or partial (per-token masking needed). Debug views (`token_mask`,
`dense_mask`), `density()`, and the routing statistics that feed the heatmaps.
Not for: deciding the routing (routing.py) or computing attention (backends).

Shapes: B batch, H heads, Nq query tokens (layout tokens [q_offset, q_offset + Nq)), N layout
tokens (= keys), C chunks, R routed slots per token (-1 = empty), T = ceil(Nq / tile) tiles.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .layout import TokenLayout


@dataclass
class RoutingStats:
    """Cheap per-call summary; tensors live on the CPU."""

    chunk_counts: torch.Tensor  # (H, C, C) int64: query tokens of chunk i (rows) routing to chunk j
    density_per_head: torch.Tensor  # (H,) float64: attended (q, k) pairs / (Nq * N)
    union_chunks_per_tile: float  # mean chunks (forced + routed) in a query tile's union
    routed_chunks_per_tile: float  # mean distinct routed chunks in a tile's union (compare to k)
    q_offset: int  # first layout token of the queries
    num_queries: int  # Nq
    backend: str  # which backend computed the attention ("" until one ran)

    @property
    def density(self) -> float:
        return float(self.density_per_head.mean())


def _tile_unions(layout: TokenLayout, tile: int, forced: torch.Tensor, routed: torch.Tensor,
                 q_offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tile_count, tile_chunks, tile_full) of a selection (see Selection's properties)."""
    B, H, Nq, R = routed.shape
    C = layout.num_chunks
    device = routed.device
    qchunk = layout.tensors_on(device).token_chunk[q_offset:q_offset + Nq]  # (Nq,)
    T = -(-Nq // tile)
    tile_of = torch.arange(Nq, device=device) // tile  # (Nq,)
    # routed selections counted per (tile, chunk); empty slots land in spare column C
    slot = torch.where(routed >= 0, routed.long(), C) + (tile_of * (C + 1))[None, None, :, None]
    counts = torch.zeros(B, H, T * (C + 1), dtype=torch.int32, device=device)
    counts.scatter_add_(2, slot.reshape(B, H, -1), torch.ones_like(slot, dtype=torch.int32).reshape(B, H, -1))
    counts = counts.view(B, H, T, C + 1)[..., :C]
    # forced links counted per tile (same for every head); routed and forced are disjoint
    forced_counts = torch.zeros(T, C, dtype=torch.int32, device=device)
    forced_counts.index_add_(0, tile_of, forced[qchunk].to(torch.int32))
    total = counts + forced_counts  # (B, H, T, C) tokens of the tile attending each chunk
    # tokens per tile: `tile`, the last one the rest (not bincount: its size waits for the GPU)
    tile_tokens = torch.full((T,), tile, dtype=torch.int32, device=device)
    tile_tokens[-1:].fill_(Nq - (T - 1) * tile)  # fill_: a kernel argument, not a blocking host copy
    union = total > 0
    full = total == tile_tokens[:, None]
    ids = torch.arange(C, device=device)
    order = torch.where(union, ids, C + ids).argsort(-1)  # union chunks first, ascending
    tile_chunks = torch.where(union.gather(-1, order), order, -1).to(torch.int32)
    tile_full = full.gather(-1, order) & (tile_chunks >= 0)
    return union.sum(-1, dtype=torch.int32), tile_chunks, tile_full


@dataclass
class Selection:
    layout: TokenLayout
    tile: int  # query rows per tile
    q_offset: int  # queries are layout tokens [q_offset, q_offset + Nq)
    forced: torch.Tensor  # (C, C) bool: query chunk i always attends key chunk j
    routed: torch.Tensor  # (B, H, Nq, R) int32 routed chunk ids, -1 = empty slot
    info: dict = field(default_factory=dict)  # what ran on it (backend, dispatch reason)
    forced_host: torch.Tensor | None = None  # (C, C) bool: `forced` on the host, when known there
    # the tile unions (tile_count, tile_chunks, tile_full), built on first use: the tile kernels,
    # flex and the statistics read them, "gather" does not (at MoC-180k they cost a sort and a
    # scatter with 128-fold collisions, about 1 ms of the forward)
    _tiles: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @staticmethod
    def build(layout: TokenLayout, tile: int, forced: torch.Tensor, routed: torch.Tensor,
              q_offset: int, forced_host: torch.Tensor | None = None) -> "Selection":
        """`forced` may sit on any device (it is copied to routed's); `forced_host`, its copy on
        the host when the caller has one (routing does), lets backends plan per forced group without
        reading the GPU back. A host `forced` is its own host copy."""
        if forced_host is None and forced.device.type == "cpu":
            forced_host = forced
        return Selection(layout, tile, q_offset, forced.to(routed.device), routed, forced_host=forced_host)

    @property
    def tile_count(self) -> torch.Tensor:
        """(B, H, T) int32 chunks in each tile's union."""
        return self._tile_tables()[0]

    @property
    def tile_chunks(self) -> torch.Tensor:
        """(B, H, T, C) int32 union chunk ids ascending, then -1."""
        return self._tile_tables()[1]

    @property
    def tile_full(self) -> torch.Tensor:
        """(B, H, T, C) bool, aligned with tile_chunks: no per-token mask needed."""
        return self._tile_tables()[2]

    def _tile_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._tiles is None:
            self._tiles = _tile_unions(self.layout, self.tile, self.forced, self.routed, self.q_offset)
        return self._tiles

    # ---- sizes -------------------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int, int]:
        B, H, Nq, _ = self.routed.shape
        return B, H, Nq

    @property
    def num_keys(self) -> int:
        return self.layout.num_tokens

    @property
    def query_chunks(self) -> torch.Tensor:
        """(Nq,) chunk of every query token."""
        Nq = self.routed.shape[2]
        return self.layout.tensors_on(self.routed.device).token_chunk[self.q_offset:self.q_offset + Nq]

    # ---- views -------------------------------------------------------------------------------

    def heads(self, h0: int, h1: int) -> "Selection":
        """The selection of heads [h0, h1) alone (what a backend running heads in groups takes)."""
        tiles = None if self._tiles is None else tuple(x[:, h0:h1].contiguous() for x in self._tiles)
        return Selection(self.layout, self.tile, self.q_offset, self.forced, self.routed[:, h0:h1].contiguous(),
                         forced_host=self.forced_host, _tiles=tiles)

    def token_mask(self) -> torch.Tensor:
        """(B, H, Nq, C) bool: token attends chunk (forced or routed)."""
        B, H, Nq, R = self.routed.shape
        C = self.layout.num_chunks
        mask = torch.zeros(B, H, Nq, C + 1, dtype=torch.bool, device=self.routed.device)
        mask.scatter_(-1, torch.where(self.routed >= 0, self.routed.long(), C), True)
        return mask[..., :C] | self.forced[self.query_chunks][None, None]

    def token_bits(self) -> torch.Tensor:
        """(B, H, Nq, W) int32 bitsets over chunks, W = ceil(C / 32); bit j%32 of word j//32."""
        mask = self.token_mask()
        C = mask.shape[-1]
        W = -(-C // 32)
        mask = torch.nn.functional.pad(mask, (0, W * 32 - C)).view(*mask.shape[:-1], W, 32)
        weights = torch.ones(32, dtype=torch.int64, device=mask.device) << torch.arange(32, device=mask.device)
        words = (mask.long() * weights).sum(-1)  # (B, H, Nq, W) in [0, 2^32)
        return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)

    def dense_mask(self, b: int = 0, h: int = 0) -> torch.Tensor:
        """(Nq, N) bool: the attention pattern of one (batch, head), for debugging and tests."""
        token_chunk = self.layout.tensors_on(self.routed.device).token_chunk
        return self.token_mask()[b, h][:, token_chunk]

    # ---- statistics --------------------------------------------------------------------------

    def attended_keys(self) -> torch.Tensor:
        """(B, H, Nq) float64: keys each query attends."""
        clen = self.layout.tensors_on(self.routed.device).chunk_len.double()
        forced_len = (self.forced.double() @ clen)[self.query_chunks]  # (Nq,)
        routed_len = torch.where(self.routed >= 0, clen[self.routed.long().clamp(min=0)], 0.0).sum(-1)
        return routed_len + forced_len[None, None]

    def density(self) -> float:
        """Fraction of the (query, key) pairs that are attended."""
        return float(self.attended_keys().mean() / self.num_keys)

    def density_per_head(self) -> torch.Tensor:
        return (self.attended_keys().mean(dim=(0, 2)) / self.num_keys).cpu()

    def attention_flops(self, head_dim: int) -> tuple[float, float]:
        """(MoC, dense) forward FLOPs of QK^T and PV over all batches and heads: 4 * D per pair."""
        B, H, Nq = self.shape
        moc = float(self.attended_keys().sum()) * 4 * head_dim
        return moc, float(B * H * Nq * self.num_keys) * 4 * head_dim

    def chunk_counts(self, host: bool = True) -> torch.Tensor:
        """(H, C, C) int64 routed selections: rows are query chunks, columns key chunks; on the
        host, or with host=False where the selection is (no wait for the GPU)."""
        B, H, Nq, R = self.routed.shape
        C = self.layout.num_chunks
        key = torch.where(self.routed >= 0, self.routed.long(), C)  # (B, H, Nq, R)
        flat = (self.query_chunks.long()[None, None, :, None] * (C + 1) + key).permute(1, 0, 2, 3).reshape(H, -1)
        counts = torch.zeros(H, C * (C + 1), dtype=torch.int64, device=self.routed.device)
        counts.scatter_add_(1, flat, torch.ones_like(flat))
        counts = counts.view(H, C, C + 1)[..., :C]
        return counts.cpu() if host else counts

    def stats(self) -> RoutingStats:
        routed_union = self.tile_count.float() - self._forced_per_tile().float()[None, None]
        return RoutingStats(
            chunk_counts=self.chunk_counts(),
            density_per_head=self.density_per_head(),
            union_chunks_per_tile=float(self.tile_count.float().mean()),
            routed_chunks_per_tile=float(routed_union.mean()),
            q_offset=self.q_offset,
            num_queries=self.routed.shape[2],
            backend=str(self.info.get("backend", "")),
        )

    def _forced_per_tile(self) -> torch.Tensor:
        """(T,) chunks forced for at least one token of each tile."""
        Nq = self.routed.shape[2]
        T = self.tile_count.shape[-1]
        tile_of = torch.arange(Nq, device=self.routed.device) // self.tile
        any_forced = torch.zeros(T, self.layout.num_chunks, dtype=torch.int32, device=self.routed.device)
        any_forced.index_add_(0, tile_of, self.forced[self.query_chunks].to(torch.int32))
        return (any_forced > 0).sum(-1)
