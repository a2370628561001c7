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
    (B, H, N, D) of fixed shapes, dtype and device, captured once and replayed per call."""

    def __init__(self, layout: TokenLayout, config: MoCConfig, q_shape: tuple[int, ...], kv_shape: tuple[int, ...],
                 dtype: torch.dtype, device: torch.device | str, backend: str = "gather", q_offset: int = 0,
                 warmup: int = 2, seed: int = 0):
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"GraphedAttention needs a CUDA device (CUDA graphs), got {device}: call "
                             "engine.moc.attend directly instead")
        g = torch.Generator(device).manual_seed(seed)  # finite inputs for the eager warm-up runs
        self.q = torch.randn(q_shape, generator=g, device=device, dtype=dtype)
        self.k = torch.randn(kv_shape, generator=g, device=device, dtype=dtype)
        self.v = torch.randn(kv_shape, generator=g, device=device, dtype=dtype)
        self.layout, self.config, self.backend, self.q_offset = layout, config, backend, q_offset
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
        return attend(self.q, self.k, self.v, self.layout, self.config, backend=self.backend,
                      q_offset=self.q_offset)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The attention of q over k, v: (B, H, Nq, D), the graph's static output."""
        for name, x, buf in (("q", q, self.q), ("k", k, self.k), ("v", v, self.v)):
            if x.shape != buf.shape or x.dtype != buf.dtype or x.device != buf.device:
                raise ValueError(f"{name} must be {tuple(buf.shape)} {buf.dtype} on {buf.device} as captured, "
                                 f"got {tuple(x.shape)} {x.dtype} on {x.device}: capture a new GraphedAttention")
        self.q.copy_(q)
        self.k.copy_(k)
        self.v.copy_(v)
        self.graph.replay()
        return self.out


__all__ = ["GraphedAttention"]
