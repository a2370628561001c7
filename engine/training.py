"""One training step of the story model: flow matching with per-shot noise levels and MoC.

For: `training_loss(model, batch, config, generator)`, the loss the trainer (engine/trainer.py)
calls per batch: a batch is several stories that share one shot layout (same shot count and
frames per shot, different content and captions); every shot of every story draws its own noise
level (LCT: low-noise shots act as context for the others, which is what shot-by-shot sampling
and regeneration later rely on), tokens carry their shot's timestep (Wan's per-token timestep
input), and routing runs in training mode (context drop-off / drop-in).
Not for: data generation, optimisers, checkpoints (engine/trainer.py owns those).
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
    shift: float = 3.0  # noise levels drawn as the sampler's shifted schedule spends its steps
    shared_sigma: float = 0.5  # probability that all shots of a story share one level (joint sampling)


@dataclass
class StoryBatch:
    latents: torch.Tensor  # (B, C, F, h, w) clean latents, shots concatenated along frames
    shot_frames: tuple[int, ...]  # latent frames per shot, shared by the batch
    text: list[list[torch.Tensor]]  # per story: [global caption, caption of shot 0, ...] (L, text_dim)
    weights: torch.Tensor | None = None  # (B, F, h, w) >= 0 per latent cell: the loss's weights (None: uniform)


def draw_shot_sigmas(batch: int, shots: int, config: TrainingConfig,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, S) noise levels in (0, 1): u ~ U(0, 1) through the sampler's shift, per shot, or one
    per story with probability `shared_sigma`."""
    device = None if generator is None else generator.device
    u = torch.rand(batch, shots, generator=generator, device=device).cpu()
    shared = torch.rand(batch, 1, generator=generator, device=device).cpu() < config.shared_sigma
    u = torch.where(shared, u[:, :1], u)
    s = config.shift
    return s * u / (1 + (s - 1) * u)


def training_loss(model, batch: StoryBatch, config: TrainingConfig, generator: torch.Generator | None = None,
                  shot_sigmas: torch.Tensor | None = None) -> torch.Tensor:
    """Flow-matching loss over a batch of stories. shot_sigmas (B, S) in [0, 1]: noise level per
    story and shot (default: `draw_shot_sigmas`). The generator (CPU or on the model's device)
    draws noise levels, noise and drop-off / drop-in. Returns a scalar with gradients."""
    tr = model.transformer if hasattr(model, "transformer") else model
    device = next(tr.model.parameters()).device
    x0 = batch.latents.to(device, torch.float32)  # (B, C, F, h, w)
    B, C, F, h, w = x0.shape
    frames = tuple(batch.shot_frames)
    S = len(frames)
    if sum(frames) != F:
        raise ValueError(f"shot_frames {frames} add up to {sum(frames)} frames, latents hold {F}")
    if len(batch.text) != B or any(len(t) != S + 1 for t in batch.text):
        raise ValueError(f"text must hold, for each of the {B} stories, the global caption and {S} shot captions")
    if shot_sigmas is None:
        shot_sigmas = draw_shot_sigmas(B, S, config, generator)
    gen_device = torch.device("cpu") if generator is None else generator.device
    noise = torch.randn(x0.shape, generator=generator, device=gen_device).to(device)
    sigma_f = torch.repeat_interleave(shot_sigmas.float().to(device), torch.tensor(frames, device=device), dim=1)
    s = sigma_f[:, None, :, None, None]  # (B, 1, F, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    target = noise - x0  # the flow the model predicts
    layout = TokenLayout(tr.frame_tokens(h, w), frames, chunking=config.chunking, chunk_size=config.chunk_size)
    timestep = torch.repeat_interleave(sigma_f, layout.frame_tokens, dim=1) * config.num_train_timesteps  # (B, N)
    ranges = [(*layout.shot_range(i), i) for i in range(S)]
    text, cross = make_cross_plan(batch.text, ranges, device)
    plan = ForwardPlan(
        self_attn=SelfAttentionPlan(layout=layout, q_offset=0, moc=config.moc, backend=config.backend,
                                    training=True, generator=generator),
        cross_attn=cross, rotary=tr.rotary(0, F, h, w, device))
    dtype = next(tr.model.parameters()).dtype
    flow = tr.forward(x_t.to(dtype), timestep, text.to(dtype), plan).float()
    err = (flow - target) ** 2
    if batch.weights is None:
        return torch.mean(err)
    if tuple(batch.weights.shape) != (B, F, h, w):
        raise ValueError(f"weights must be (B, F, h, w) = {(B, F, h, w)}, got {tuple(batch.weights.shape)}")
    cell = batch.weights.to(device, torch.float32)[:, None]  # (B, 1, F, h, w): a cell's channels share it
    return (err * cell).mean() / cell.mean().clamp_min(1e-8)


__all__ = ["TrainingConfig", "StoryBatch", "draw_shot_sigmas", "training_loss"]
