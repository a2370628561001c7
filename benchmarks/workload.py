"""The benchmark workload of MOC.md: the MoC-180k layout and its structured inputs.

For: every benchmark in this folder, so that all figures use one definition of the workload.
Not for: tests (they draw their own fresh random inputs).

Structured inputs: per latent frame f and head h there is a frame vector u[f, h] (D,), and the
q and k of every token of frame f are u[f, h] plus smaller per-token noise (sigma). Frame vectors
repeat across shots (frame j of shot s reuses frame j of shot s - `repeat_every`), the way a
character or a place returns, so routing is locally coherent as in a real model.
"""

from __future__ import annotations

import torch

from engine.moc import TokenLayout


def moc_layout(shots: int = 8, frames_per_shot: int = 15, frame_tokens: int = 1500) -> TokenLayout:
    """MoC-180k by default: 8 shots x 15 latent frames x 1,500 tokens = 180,000 tokens."""
    return TokenLayout(frame_tokens=frame_tokens, shot_frames=(frames_per_shot,) * shots)


def structured_qkv(layout: TokenLayout, heads: int, head_dim: int, *, sigma: float = 0.35,
                   repeat_every: int = 2, device="cpu", dtype=torch.float32, seed: int = 0):
    """(q, k, v), each (1, H, N, D): frame vector + per-token noise; v is i.i.d. normal."""
    g = torch.Generator(device=device).manual_seed(seed)
    F = layout.num_frames
    frames_per_shot = layout.shot_frames[0]
    base = torch.randn(repeat_every * frames_per_shot, heads, head_dim, generator=g, device=device)
    frame_vec = base[torch.arange(F, device=device) % base.shape[0]]  # (F, H, D) repeats across shots
    token_frame = torch.arange(layout.num_tokens, device=device) // layout.frame_tokens  # no text here
    out = []
    for _ in range(2):
        noise = torch.randn(heads, layout.num_tokens, head_dim, generator=g, device=device)
        out.append((frame_vec[token_frame].transpose(0, 1) + sigma * noise)[None].to(dtype))
    v = torch.randn(1, heads, layout.num_tokens, head_dim, generator=g, device=device).to(dtype)
    return out[0], out[1], v


def random_qkv(layout: TokenLayout, heads: int, head_dim: int, *, device="cpu", dtype=torch.float32, seed: int = 0):
    """The worst case for routing: i.i.d. normal q, k, v."""
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (1, heads, layout.num_tokens, head_dim)
    return tuple(torch.randn(shape, generator=g, device=device).to(dtype) for _ in range(3))
