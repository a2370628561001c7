"""MoC attention (routing included) replayed from one CUDA graph: the launch and host work gone.

For: measuring what MoC costs without its fixed per-call overhead (`benchmarks/attention.py`'s
`moc-gather-graph` row), the step before replaying whole sampling steps from graphs. At 16k tokens
on the H200 the gather path's kernels take about 1.6 of its 4.0 ms; the rest is launches and host
work, which a graph replay removes. Rendering has what a graph needs: every sampling step calls
self-attention with the same shapes and layout, and the gather path never reads the GPU back.
Not for: training (no backward), or anything on the CPU (CUDA graphs are CUDA only).

A `GraphedAttention` owns static q, k, v buffers: a call copies its inputs in, replays the graph
and returns the static output (overwritten by the next call: copy it to keep it). Capture runs
the path eagerly first on the same buffers, so Triton's autotuning and the layout's memoised
tables are done before the graph records.
"""

from __future__ import annotations

import torch

from .attention import attend
from .layout import TokenLayout
from .routing import MoCConfig


class GraphedAttention:
    """`attend(q, k, v, layout, config, backend=backend)` forward for q (B, H, Nq, D) and k, v
    (B, H, N, D) of fixed shapes, dtype and device, captured once and replayed per call.
    route_shapes: the shapes of (q_route, k_route) when routing scores other tensors than q and k
    (pre-RoPE routing); they are then static buffers too. `inputs` (q, k, v[, q_route, k_route]):
    real tensors to fill the buffers with for the warm-up (finite random ones otherwise)."""

    def __init__(self, layout: TokenLayout, config: MoCConfig, q_shape: tuple[int, ...], kv_shape: tuple[int, ...],
                 dtype: torch.dtype, device: torch.device | str, backend: str = "gather", q_offset: int = 0,
                 warmup: int = 2, seed: int = 0, route_shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
                 scale: float | None = None, inputs: tuple[torch.Tensor, ...] | None = None):
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"GraphedAttention needs a CUDA device (CUDA graphs), got {device}: call "
                             "engine.moc.attend directly instead")
        shapes = [q_shape, kv_shape, kv_shape] + list(route_shapes or ())
        if inputs is not None:
            self.buffers = [x.detach().clone(memory_format=torch.contiguous_format) for x in inputs]
        else:
            g = torch.Generator(device).manual_seed(seed)  # finite inputs for the eager warm-up runs
            self.buffers = [torch.randn(shape, generator=g, device=device, dtype=dtype) for shape in shapes]
        if [tuple(b.shape) for b in self.buffers] != [tuple(s) for s in shapes]:
            raise ValueError(f"inputs of shapes {[tuple(b.shape) for b in self.buffers]} do not match {shapes}")
        self.q, self.k, self.v = self.buffers[:3]
        self.layout, self.config, self.backend, self.q_offset, self.scale = layout, config, backend, q_offset, scale
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.no_grad():  # warm up off the default stream, as capture wants
            for _ in range(max(1, warmup)):
                self._attend()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.out, self.selection = self._attend()

    def _attend(self):
        q_route, k_route = self.buffers[3:] if len(self.buffers) == 5 else (None, None)
        return attend(self.q, self.k, self.v, self.layout, self.config, backend=self.backend,
                      q_offset=self.q_offset, q_route=q_route, k_route=k_route, scale=self.scale, graph=False)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_route: torch.Tensor | None = None,
                 k_route: torch.Tensor | None = None) -> torch.Tensor:
        """The attention of q over k, v: (B, H, Nq, D), the graph's static output."""
        given = [q, k, v] + ([q_route, k_route] if len(self.buffers) == 5 else [])
        if (q_route is not None or k_route is not None) and len(self.buffers) == 3:
            raise ValueError("this graph routes on q and k: capture one with route_shapes to pass q_route, k_route")
        for name, x, buf in zip(("q", "k", "v", "q_route", "k_route"), given, self.buffers):
            if x is None or x.shape != buf.shape or x.dtype != buf.dtype or x.device != buf.device:
                got = None if x is None else (tuple(x.shape), x.dtype, x.device)
                raise ValueError(f"{name} must be {tuple(buf.shape)} {buf.dtype} on {buf.device} as captured, "
                                 f"got {got}: capture a new GraphedAttention")
        for x, buf in zip(given, self.buffers):
            buf.copy_(x)
        self.graph.replay()
        return self.out


__all__ = ["GraphedAttention"]
