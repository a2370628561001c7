"""The context K/V cache: keys and values of fixed context shots, computed once and reused.

For: shot-by-shot generation and regeneration. Each context shot's self-attention K/V (per
layer, post-RoPE) is written once by a "context pass" (the shot's clean latents re-noised to t_c);
every later denoising step only writes the live shot's K/V next to it and attends over the
whole prefix. One buffer per layer in the layout's token order, so the attention call gets views
(no concatenation per step).
Not for: caching finished shots on disk (shot_cache.py) or deciding what is context (engine.py).

Lifecycle: `ContextKV(...)` -> `update(layer, start, k, v, end)` from the processors (a context
pass and a denoising step write the same way; the last write at a position wins) ->
`mark_context(start, end)` once a context pass has finished -> `invalidate(start)`. Both-sided
regeneration encodes every shot as context, then `open_hole(start, end)` lets the regenerated
shot's live tokens overwrite their own positions inside it (`close_hole()` after).
Kept between renders (StoryEngine, SamplerOptions.keep_context): `mark_context(start, end, key)`
records which pass wrote tokens [start, end) (`held`, a key naming everything that pass read);
any later write into that range forgets it. The next render calls `restart()` and, for a pass
whose key it still holds (`holds`), marks the range as context again without running it.
Storage is (B, N, H, D) (Wan's native layout after the head split), so the (B, H, N, D) view the
attention backends receive is a transpose with a contiguous last dim.
"""

from __future__ import annotations

import torch


class ContextKV:
    def __init__(self, num_layers: int, batch: int, capacity: int, heads: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device, route_keys: bool = False):
        self.capacity = capacity  # tokens the buffers hold (the longest layout of the render)
        shape = (batch, capacity, heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]  # (B, N, H, D)
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        # routing keys when routing does not use the attention keys (MoCConfig.descriptor_rope=False)
        self.r = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)] if route_keys else None
        self.context_end = 0  # tokens [0, context_end) hold finished context K/V
        self.hole: tuple[int, int] | None = None  # live tokens inside finished context (both-sided)
        # (start, end) -> key of the context pass whose K/V tokens [start, end) still hold; kept
        # across renders, dropped by any write into the range
        self.held: dict[tuple[int, int], str] = {}
        self.spec = self.describe(num_layers, batch, capacity, heads, head_dim, dtype=dtype, device=device,
                                  route_keys=route_keys)

    @staticmethod
    def describe(num_layers: int, batch: int, capacity: int, heads: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device, route_keys: bool = False) -> tuple:
        """What a cache built with these arguments holds: a kept cache serves a render whose
        description is equal (`spec`)."""
        return (num_layers, batch, capacity, heads, head_dim, dtype, torch.device(device), route_keys)

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor, end: int,
               k_route: torch.Tensor | None = None):
        """Write k, v (B, n, H, D) at tokens [start, start + n); return (B, H, end, D) views of
        tokens [0, end) for keys and values. Live tokens must not overwrite finished context.
        With route_keys, `k_route` is stored too and `routing_keys(layer, end)` views it."""
        n = k.shape[1]
        in_hole = self.hole is not None and self.hole[0] <= start and start + n <= self.hole[1]
        if start < self.context_end and not in_hole:
            raise ValueError(f"live tokens start at {start} but context is final up to {self.context_end}; "
                             "call invalidate(start) first")
        if not start + n <= end <= self.capacity:
            raise ValueError(f"write [{start}, {start + n}) and view [0, {end}) must fit the capacity {self.capacity}")
        if self.held:
            self._forget(start, start + n)
        self.k[layer][:, start:start + n] = k
        self.v[layer][:, start:start + n] = v
        if (k_route is None) != (self.r is None):
            raise ValueError("pass k_route exactly when the cache was built with route_keys=True")
        if k_route is not None:
            self.r[layer][:, start:start + n] = k_route
        return self.k[layer][:, :end].transpose(1, 2), self.v[layer][:, :end].transpose(1, 2)

    def routing_keys(self, layer: int, end: int) -> torch.Tensor:
        """(B, H, end, D) view of the stored routing keys of tokens [0, end)."""
        return self.r[layer][:, :end].transpose(1, 2)

    def mark_context(self, start: int, end: int, key: str | None = None) -> None:
        """Tokens [start, end) were written by a context pass and are now final. key: what that
        pass read (its inputs and every earlier pass's key), remembered for a later render."""
        if start != self.context_end:
            raise ValueError(f"context must grow in order: expected a pass starting at {self.context_end}, got {start}")
        self.context_end = end
        if key is not None:
            self.held[(start, end)] = key

    def holds(self, start: int, end: int, key: str) -> bool:
        """Whether tokens [start, end) still hold the K/V of the context pass named `key`."""
        return self.held.get((start, end)) == key

    def _forget(self, start: int, end: int) -> None:
        for a, b in [r for r in self.held if r[0] < end and start < r[1]]:
            del self.held[(a, b)]

    def restart(self) -> None:
        """A new render: no context is final yet; the passes recorded in `held` stay there."""
        self.context_end = 0
        self.hole = None

    def open_hole(self, start: int, end: int) -> None:
        """Let live tokens [start, end) be written although they lie inside finished context."""
        if not 0 <= start < end <= self.context_end:
            raise ValueError(f"a hole [{start}, {end}) must lie inside the finished context [0, {self.context_end})")
        self.hole = (start, end)

    def close_hole(self) -> None:
        self.hole = None

    def invalidate(self, start: int = 0) -> None:
        """Forget context from token `start` on (the buffers are overwritten by later passes)."""
        self.context_end = min(self.context_end, start)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v + (self.r or []))


__all__ = ["ContextKV"]
