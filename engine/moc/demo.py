"""A text demo of MoC routing on a random multi-shot layout (`python launch.py --routing-demo`).

For: seeing, without a model, which earlier frames each shot's frames choose and how dense the
result is. Uses the structured inputs of the benchmarks (frames that recur across shots), so the
recalls are meaningful: a frame should pick up its earlier appearances.
Not for: timing (benchmarks/) or tests.
"""

from __future__ import annotations

import torch

from .layout import TokenLayout
from .routing import MoCConfig, route


def routing_demo(seed: int = 0, shots: int = 4, frames: int = 3, frame_tokens: int = 64,
                 heads: int = 4, head_dim: int = 32, top_k: int = 3) -> str:
    """Returns the report as text: per query frame, the earlier frames it recalled most."""
    g = torch.Generator().manual_seed(seed)
    layout = TokenLayout(frame_tokens=frame_tokens, shot_frames=(frames,) * shots)
    F = layout.num_frames
    # shot s frame j looks like shot s-2 frame j (a returning character), plus token noise
    looks = torch.randn(2 * frames, heads, head_dim, generator=g)
    frame_vec = looks[torch.arange(F) % (2 * frames)]  # (F, H, D)
    token_frame = torch.arange(layout.num_tokens) // frame_tokens
    q, k = [(frame_vec[token_frame].transpose(0, 1) + 0.5 * torch.randn(heads, layout.num_tokens, head_dim, generator=g))[None]
            for _ in range(2)]
    config = MoCConfig(top_k=top_k)
    sel = route(q, k, layout, config)
    counts = sel.chunk_counts().sum(0).double()  # (C, C) chunks are frames here
    lines = [f"layout: {shots} shots x {frames} frames x {frame_tokens} tokens = {layout.num_tokens} tokens, "
             f"{heads} heads, k={top_k}, causal, intra-shot anchor",
             f"density {sel.density():.3f} (sparsity {1 - sel.density():.3f})"]
    for f in range(F):
        shot = f // frames
        row = counts[f] / (frame_tokens * heads)
        top = [(j, float(row[j])) for j in row.argsort(descending=True).tolist() if row[j] > 0][:top_k]
        picks = ", ".join(f"s{j // frames}f{j % frames} {p:.0%}" for j, p in top) or "(own shot only)"
        lines.append(f"shot {shot} frame {f % frames}: {picks}")
    return "\n".join(lines)
