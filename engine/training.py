"""One training step of the story model: flow matching with per-shot noise levels and MoC.

For: `training_loss(model, batch, config, generator)`, the loss a training script (the future
default-model trainer) calls per batch: every shot draws its own noise level (LCT: low-noise
shots act as context for the others), tokens carry their shot's timestep (Wan's per-token
timestep input), and routing runs in training mode (context drop-off / drop-in).
Not for: data generation, optimisers, checkpoints (the training script owns those).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.backbone import make_cross_plan
from engine.moc import MoCConfig, TokenLayout
from engine.processors import ForwardPlan, SelfAttentionPlan


@dataclass(frozen=True)
class TrainingConfig:
    moc: MoCConfig | None = MoCConfig()  # routing (drop_off / drop_in apply in training); None = dense
    backend: str = "reference"  # moc_attention backend (autograd-capable)
    chunking: str = "frame"  # TokenLayout chunking
    chunk_size: int = 0  # for "subframe" / "fixed"
    num_train_timesteps: int = 1000  # the scheduler's timestep scale


@dataclass
class StoryBatch:
    latents: list[torch.Tensor]  # per shot (C, f_s, h, w), clean, story order (batch size 1 story)
    text: list[torch.Tensor]  # [global caption, caption of shot 0, ...] token states (L, text_dim)


def training_loss(model, batch: StoryBatch, config: TrainingConfig, generator: torch.Generator | None = None,
                  shot_sigmas: torch.Tensor | None = None) -> torch.Tensor:
    """Flow-matching loss over one story. shot_sigmas (S,) in [0, 1]: noise level per shot
    (default: drawn uniformly per shot). Returns a scalar with gradients on the transformer."""
    tr = model.transformer if hasattr(model, "transformer") else model
    device = next(tr.model.parameters()).device
    dtype = next(tr.model.parameters()).dtype
    S = len(batch.latents)
    C, _, h, w = batch.latents[0].shape
    frames = [x.shape[1] for x in batch.latents]
    if shot_sigmas is None:
        shot_sigmas = torch.rand(S, generator=generator)
    x0 = torch.cat(batch.latents, dim=1).to(device, torch.float32)  # (C, F, h, w)
    noise = torch.randn(x0.shape, generator=generator).to(device)
    sigma_f = torch.repeat_interleave(shot_sigmas.float(), torch.tensor(frames)).to(device)  # (F,)
    x_t = (1 - sigma_f[None, :, None, None]) * x0 + sigma_f[None, :, None, None] * noise
    target = noise - x0  # the flow the model predicts
    layout = TokenLayout(tr.frame_tokens(h, w), tuple(frames), chunking=config.chunking, chunk_size=config.chunk_size)
    timestep = torch.repeat_interleave(sigma_f, layout.frame_tokens) * config.num_train_timesteps  # (N,)
    ranges = [(*layout.shot_range(s), s) for s in range(S)]
    text, cross = make_cross_plan([batch.text], ranges, device)
    plan = ForwardPlan(
        self_attn=SelfAttentionPlan(layout=layout, q_offset=0, moc=config.moc, backend=config.backend,
                                    training=True, generator=generator),
        cross_attn=cross, rotary=tr.rotary(0, sum(frames), h, w, device))
    flow = tr.forward(x_t[None].to(dtype), timestep[None], text.to(dtype), plan)[0].float()
    return torch.mean((flow - target) ** 2)


__all__ = ["TrainingConfig", "StoryBatch", "training_loss"]
