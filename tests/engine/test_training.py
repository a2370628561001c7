"""The training step: per-shot noise levels, MoC in training mode, gradients reach Q/K/V."""

import torch

from engine.training import StoryBatch, TrainingConfig, training_loss


def test_training_loss_backpropagates(tiny_model):
    tr = tiny_model.transformer
    tr.model.requires_grad_(True)
    try:
        g = torch.Generator().manual_seed(0)
        batch = StoryBatch(latents=[torch.randn(3, f, 6, 10, generator=g) for f in (3, 2)],
                           text=tiny_model.text_encoder.encode(["shapes", "a red square", "a blue circle"]))
        loss = training_loss(tiny_model, batch, TrainingConfig(), generator=g)
        loss.backward()
        assert torch.isfinite(loss)
        attn = tr.model.blocks[0].attn1
        for proj in (attn.to_q, attn.to_k, attn.to_v):
            assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    finally:
        tr.model.requires_grad_(False)
        tr.model.zero_grad(set_to_none=True)
