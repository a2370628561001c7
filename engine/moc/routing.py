"""MoC routing: which chunks every query token attends to, computed once for all backends.

For: chunk descriptors (mean of each chunk's keys), forced links (own chunk, own shot or a local
window, the text anchor), the causal rule, per-token per-head top-k, and the training-time
context drop-off / drop-in. The result is a `Selection` (selection.py): sparsity as data.
Not for: computing attention (attention.py and the backends) or the fused GPU routing
(triton_routing.py, which must return the same Selection).

Rules, exactly (MOC.md §1):
  forced(i, j): j == i; or same shot (anchor="shot"); or same shot and |i - j| <= window
      (anchor="window"); or, with text_anchor, j is the global caption or the caption of i's shot.
      Memory pins: j is a video chunk of shot b and i a chunk of shot a, for (a, b) in pins.
  candidate(i, j): not forced(i, j), and j < i when causal (chunk order = sequence order) unless
      i's shot is in open_shots (both-sided regeneration: the later shots are fixed context), and
      not blocked: (shot of i, shot of j) is not in blocks (a shot never recalls a blocked shot).
  routed(t): the top min(k, #candidates) candidates of t's chunk by q_t · mean(K_j), per head.
      With open_top_k = k' > 0, an open shot's later chunks do not compete in that top-k: its
      queries route top-k among the causal candidates, exactly as without open_shots, plus the
      top min(k', #later candidates) among the later ones (k + k' slots; other queries leave the
      k' slots empty). A both-sided regeneration then keeps every earlier recall.
Descriptors are taken from whichever keys the caller passes: the Wan processor passes post-RoPE
q and k by default (MoCConfig.descriptor_rope), so scores rank chunks the way attention will.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from .layout import TokenLayout
from .selection import Selection

ANCHORS = ("shot", "chunk", "window")
ROUTE_IMPLS = ("auto", "reference", "triton")  # "auto": fused Triton on CUDA, the reference elsewhere


@dataclass(frozen=True)
class MoCConfig:
    top_k: int = 5  # routed chunks per query token and head (paper: 3 single-shot, 5 multi-shot)
    anchor: str = "shot"  # forced intra link: "shot" (whole shot), "chunk" (own chunk), "window"
    window: int = 1  # anchor="window": chunks within this distance in the same shot are forced
    text_anchor: bool = True  # video queries always see the global caption and their shot's caption
    causal: bool = True  # a routed chunk must lie strictly before the query's chunk
    descriptor_rope: bool = True  # route on post-RoPE q/k (True) or pre-RoPE q/k (False)
    drop_off: float = 0.5  # training: p ~ U(0, drop_off), drop floor(p * n_routed) routed chunks
    drop_in: float = 0.6  # training: add m ~ Poisson(drop_in) random candidate chunks (m <= top_k)
    pins: tuple[tuple[int, int], ...] = ()  # (query shot, key shot): always attended, like the own-shot anchor
    blocks: tuple[tuple[int, int], ...] = ()  # (query shot, key shot): never routed to
    open_shots: tuple[int, ...] = ()  # query shots that may also route to later chunks (fixed later shots)
    open_top_k: int = 0  # > 0: open shots route their later chunks in a top-k of this size of their own
    tile: int = 128  # query rows per tile of the selection's key-range union (= kernel BLOCK_M)
    route_block: int = 4096  # query tokens scored at once (bounds the fp32 score buffer)

    def __post_init__(self):
        if int(self.top_k) <= 0:
            raise ValueError(f"top_k must be >= 1 (routed chunks per query), got {self.top_k}")
        if self.anchor not in ANCHORS:
            raise ValueError(f"anchor must be one of {ANCHORS}, got {self.anchor!r}")
        if int(self.window) < 0:
            raise ValueError(f"window must be >= 0 chunks, got {self.window}")
        if not 0.0 <= float(self.drop_off) <= 1.0:
            raise ValueError(f"drop_off must be in [0, 1] (max fraction of routed chunks dropped), got {self.drop_off}")
        if not 0.0 <= float(self.drop_in) <= 64.0:
            raise ValueError(f"drop_in must be in [0, 64] (Poisson rate of added chunks), got {self.drop_in}")
        if int(self.tile) <= 0 or int(self.tile) & (int(self.tile) - 1):
            raise ValueError(f"tile must be a power of two >= 1, got {self.tile}")
        if not 0 <= int(self.open_top_k) <= 64:
            raise ValueError(f"open_top_k must be in [0, 64] (0: later chunks compete in the one top-k), "
                             f"got {self.open_top_k}")
        if int(self.route_block) <= 0:
            raise ValueError(f"route_block must be >= 1, got {self.route_block}")
        for name in ("pins", "blocks"):
            pairs = getattr(self, name)
            if not isinstance(pairs, tuple) or not all(
                    isinstance(p, tuple) and len(p) == 2 and all(isinstance(x, int) and x >= 0 for x in p)
                    for p in pairs):
                raise ValueError(f"{name} must be a tuple of (query shot, key shot) pairs of shot indices >= 0, "
                                 f"got {pairs!r}")
        both = set(self.pins) & set(self.blocks)
        if both:
            raise ValueError(f"a shot pair cannot be pinned and blocked at once: {sorted(both)}")

    @property
    def open_slots(self) -> int:
        """Slots for the open shots' own top-k over later chunks (0: none, they share the top-k)."""
        return int(self.open_top_k) if self.open_shots else 0

    @property
    def routed_slots(self) -> int:
        """Slots per token in Selection.routed without training: top_k plus open_slots."""
        return self.top_k + self.open_slots

    def topk_width(self, num_chunks: int) -> int:
        """Slots the top-k fills before training adds any: min(k, C), or with open slots k (padded)
        plus min(k', C)."""
        if self.open_slots:
            return self.top_k + min(self.open_slots, num_chunks)
        return min(self.top_k, num_chunks)

    @property
    def max_routed(self) -> int:
        """Slots per token in Selection.routed in training: routed_slots plus up to top_k
        dropped-in chunks."""
        return self.routed_slots + self.top_k if self.drop_in > 0 else self.routed_slots


def forced_links(layout: TokenLayout, config: MoCConfig) -> torch.Tensor:
    """(C, C) bool: query chunk i always attends key chunk j (before any top-k)."""
    lt = layout.tensors
    idx = torch.arange(layout.num_chunks)
    same_shot = lt.chunk_shot[:, None] == lt.chunk_shot[None, :]
    forced = idx[:, None] == idx[None, :]
    if config.anchor == "shot":
        forced |= same_shot
    elif config.anchor == "window":
        forced |= same_shot & ((idx[:, None] - idx[None, :]).abs() <= config.window)
    if config.text_anchor:
        key_text = lt.chunk_is_text[None, :]
        own_caption = lt.chunk_shot[None, :] == lt.chunk_shot[:, None]
        global_caption = lt.chunk_shot[None, :] == -1
        forced |= key_text & (own_caption | global_caption)
    for a, b in config.pins:
        forced |= (lt.chunk_shot[:, None] == a) & (lt.chunk_shot[None, :] == b) & ~lt.chunk_is_text[None, :]
    return forced


def links_on(layout: TokenLayout, config: MoCConfig, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(forced_links, candidate_links) on `device`, computed and copied once per layout and config."""
    device = torch.device(device)

    def make():
        forced = forced_links(layout, config)
        return forced.to(device), candidate_links(layout, config, forced).to(device)
    return layout.memo(("links", config, str(device)), make)


def split_candidates(layout: TokenLayout, config: MoCConfig, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(first, later) (C, C) bool on `device`: the candidates of the top-k, and those of the open
    shots' own top-k over later chunks (None unless config.open_slots; then `first` is the causal
    candidates, as without open_shots, and `later` the rest of candidate_links)."""
    _, cand = links_on(layout, config, device)
    if not config.open_slots:
        return cand, None
    _, early = links_on(layout, replace(config, open_shots=(), open_top_k=0), device)
    return early, cand & ~early


def candidate_links(layout: TokenLayout, config: MoCConfig, forced: torch.Tensor) -> torch.Tensor:
    """(C, C) bool: key chunk j may be routed to a query in chunk i."""
    cand = ~forced
    if config.causal:
        earlier = torch.ones_like(forced).tril(-1)  # strictly earlier chunks only
        if config.open_shots:
            shot = layout.tensors.chunk_shot
            earlier |= torch.isin(shot, torch.tensor(config.open_shots, dtype=shot.dtype))[:, None]
        cand &= earlier
    if config.blocks:
        lt = layout.tensors
        for a, b in config.blocks:
            cand &= ~((lt.chunk_shot[:, None] == a) & (lt.chunk_shot[None, :] == b))
    return cand


def chunk_descriptors(k: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Mean key of every chunk, per head: k (B, H, N, D) -> (B, H, C, D) float32."""
    lt = layout.tensors_on(k.device)
    B, H, N, D = k.shape
    sums = torch.zeros(B, H, layout.num_chunks, D, device=k.device, dtype=torch.float32)
    sums.index_add_(2, lt.token_chunk, k.float())  # segment sum over each chunk's tokens
    return sums / lt.chunk_len.to(torch.float32)[None, None, :, None]


def check_qk(q: torch.Tensor, k: torch.Tensor, layout: TokenLayout, q_offset: int) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be (B, H, N, D); got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must agree in B, H and D; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if k.shape[2] != layout.num_tokens:
        raise ValueError(f"k has {k.shape[2]} tokens but the layout has {layout.num_tokens}: "
                         "k must cover the whole layout")
    if not 0 <= q_offset or q_offset + q.shape[2] > layout.num_tokens:
        raise ValueError(f"q_offset must be in [0, {layout.num_tokens - q.shape[2]}] so the "
                         f"{q.shape[2]} queries fit the layout, got {q_offset}")
    if q.shape[2] == 0:
        raise ValueError("q must hold at least one query token, got 0")


@torch.no_grad()
def route(q: torch.Tensor, k: torch.Tensor, layout: TokenLayout, config: MoCConfig, *,
          q_offset: int = 0, training: bool = False, generator: torch.Generator | None = None,
          descriptors: torch.Tensor | None = None, impl: str = "auto") -> Selection:
    """Routing. q (B, H, Nq, D) are the layout's tokens [q_offset, q_offset + Nq);
    k (B, H, N, D) covers the whole layout. Returns the Selection every backend consumes.
    `descriptors` (B, H, C, D) may be passed when already known (e.g. cached context).
    `impl`: "reference" (this function's PyTorch code, the spec), "triton" (the fused GPU kernels
    of triton_routing.py, same Selection ties aside), "auto" (triton for CUDA tensors whose head
    dim it supports, else reference); which one ran is in selection.info["routing"]."""
    if impl not in ROUTE_IMPLS:
        raise ValueError(f"impl must be one of {ROUTE_IMPLS}, got {impl!r}")
    D = q.shape[-1]
    fused_ok = q.is_cuda and D >= 16 and D & (D - 1) == 0
    if impl == "triton" or (impl == "auto" and fused_ok):
        from .triton_routing import route_triton
        selection = route_triton(q, k, layout, config, q_offset=q_offset, training=training, generator=generator,
                                 descriptors=descriptors)
        selection.info["routing"] = "triton"
        return selection
    check_qk(q, k, layout, q_offset)
    B, H, Nq, D = q.shape
    device = q.device
    lt = layout.tensors_on(device)
    forced, cand = links_on(layout, config, device)
    early, later = split_candidates(layout, config, device)
    desc = chunk_descriptors(k, layout) if descriptors is None else descriptors.float()
    kk = min(config.top_k, layout.num_chunks)
    slots = config.max_routed if training else config.routed_slots
    routed = torch.full((B, H, Nq, slots), -1, dtype=torch.int32, device=device)

    def top(scores, allowed, n):  # masks `scores` in place
        val, idx = scores.masked_fill_(~allowed, float("-inf")).topk(n, dim=-1)  # (B, H, T, n)
        return torch.where(torch.isfinite(val), idx, -1)  # fewer candidates than n: keep what exists

    for t0 in range(0, Nq, config.route_block):
        t1 = min(t0 + config.route_block, Nq)
        qc = lt.token_chunk[q_offset + t0:q_offset + t1]  # (T,) query chunk of every token
        scores = torch.einsum("bhtd,bhcd->bhtc", q[:, :, t0:t1].float(), desc)  # (B, H, T, C)
        if later is None:
            idx = top(scores, early[qc], kk)
        else:  # the later chunks' own top-k, after k slots (-1 padded to k)
            ahead = top(scores.clone(), later[qc], min(config.open_slots, layout.num_chunks))
            idx = top(scores, early[qc], kk)
            idx = torch.cat([idx, idx.new_full((*idx.shape[:-1], config.top_k - kk), -1), ahead], -1)
        if training:
            idx = _drop_off(idx, config.drop_off, generator)
            extra = _drop_in(idx, cand[qc], config, generator)
            idx = torch.cat([idx, extra], dim=-1)
        routed[:, :, t0:t1, :idx.shape[-1]] = idx.to(torch.int32)

    selection = Selection.build(layout, config.tile, forced, routed, q_offset,
                                forced_host=links_on(layout, config, "cpu")[0])
    selection.info["routing"] = "reference"
    return selection


def _draw(fn, shape, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Random numbers from `generator` on the generator's own device, then moved to `device`:
    a CPU generator drives GPU routing too, and one seed gives one draw on either device."""
    if generator is None:
        return fn(shape, device=device)
    return fn(shape, generator=generator, device=generator.device).to(device)


def _drop_off(idx: torch.Tensor, p_max: float, generator) -> torch.Tensor:
    """Per query: p ~ U(0, p_max); remove floor(p * n_routed) of its routed chunks at random."""
    if p_max <= 0:
        return idx
    valid = idx >= 0
    n = valid.sum(-1, keepdim=True)  # (B, H, T, 1)
    p = _draw(torch.rand, n.shape, generator, idx.device) * p_max
    n_drop = torch.floor(p * n).long()
    r = _draw(torch.rand, idx.shape, generator, idx.device)
    r = r.masked_fill(~valid, 2.0)  # empty slots rank last, never "dropped"
    rank = r.argsort(-1).argsort(-1)  # random rank of every slot among the valid ones
    return idx.masked_fill(rank < n_drop, -1)


def _drop_in(idx: torch.Tensor, allowed: torch.Tensor, config: MoCConfig, generator) -> torch.Tensor:
    """Per query: m ~ Poisson(drop_in), m <= top_k; add m random candidates not yet routed."""
    B, H, T, _ = idx.shape
    C = allowed.shape[-1]
    lam = config.drop_in
    if lam <= 0:
        return idx.new_full((B, H, T, 0), -1)
    gen_device = idx.device if generator is None else generator.device
    m = torch.poisson(torch.full((B, H, T, 1), lam, device=gen_device), generator=generator).to(idx.device)
    m = m.clamp(max=config.top_k).long()
    # mark already-routed chunks as taken; empty slots (-1) write into a spare column C
    free = torch.cat([allowed.expand(B, H, T, C), allowed.new_zeros(B, H, T, 1)], -1).clone()
    free.scatter_(-1, torch.where(idx >= 0, idx, C).long(), False)
    free = free[..., :C]
    r = _draw(torch.rand, (B, H, T, C), generator, idx.device).masked_fill(~free, -1.0)
    val, extra = r.topk(min(config.top_k, C), dim=-1)
    slot = torch.arange(extra.shape[-1], device=idx.device)
    keep = (slot < m) & (val >= 0)
    extra = torch.where(keep, extra, -1)
    if extra.shape[-1] < config.top_k:
        extra = torch.cat([extra, extra.new_full((B, H, T, config.top_k - extra.shape[-1]), -1)], -1)
    return extra


@functools.lru_cache(maxsize=256)
def expected_density(layout: TokenLayout, config: MoCConfig) -> float:
    """Density if every query routes min(k, candidates) chunks of average length (no data).
    Memoised: the model's attention call asks once per layer and step with the same layout."""
    forced, cand = links_on(layout, config, "cpu")
    lt = layout.tensors
    clen = lt.chunk_len.double()
    n_cand = cand.sum(1).double()
    mean_cand_len = torch.where(n_cand > 0, (cand.double() @ clen) / n_cand.clamp(min=1), 0.0)
    per_chunk = forced.double() @ clen + torch.minimum(n_cand, torch.tensor(float(config.top_k))) * mean_cand_len
    return float((per_chunk * clen).sum() / (layout.num_tokens ** 2))


__all__ = ["MoCConfig", "ROUTE_IMPLS", "route", "forced_links", "candidate_links", "chunk_descriptors",
           "expected_density", "split_candidates"]
