"""The training step: per-shot noise levels, MoC in training mode, gradients reach Q/K/V."""

import pytest
import torch

from engine.training import StoryBatch, TrainingConfig, draw_shot_sigmas, training_loss


def _batch(tiny_model, g, B=2, frames=(3, 2)):
    latents = torch.randn(B, 3, sum(frames), 6, 10, generator=g)
    captions = [["shapes", "a red square", "a blue circle"], ["night", "a green diamond", "it bounces"]][:B]
    return StoryBatch(latents, frames, [tiny_model.text_encoder.encode(c) for c in captions])


def test_training_loss_backpropagates(tiny_model):
    tr = tiny_model.transformer
    tr.model.requires_grad_(True)
    try:
        g = torch.Generator().manual_seed(0)
        loss = training_loss(tiny_model, _batch(tiny_model, g), TrainingConfig(), generator=g)
        loss.backward()
        assert torch.isfinite(loss)
        attn = tr.model.blocks[0].attn1
        for proj in (attn.to_q, attn.to_k, attn.to_v):
            assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    finally:
        tr.model.requires_grad_(False)
        tr.model.zero_grad(set_to_none=True)


def test_training_loss_is_deterministic_given_a_generator(tiny_model):
    losses = [training_loss(tiny_model, _batch(tiny_model, torch.Generator().manual_seed(1)), TrainingConfig(),
                            generator=torch.Generator().manual_seed(7)).item() for _ in range(2)]
    assert losses[0] == losses[1]
    other = training_loss(tiny_model, _batch(tiny_model, torch.Generator().manual_seed(1)), TrainingConfig(),
                          generator=torch.Generator().manual_seed(8)).item()
    assert other != losses[0]


def test_shot_sigmas_follow_the_shifted_schedule():
    sig = draw_shot_sigmas(4000, 3, TrainingConfig(shift=3.0, shared_sigma=0.5), torch.Generator().manual_seed(0))
    assert sig.min() > 0 and sig.max() < 1
    shared = (sig[:, 0] == sig[:, 1]) & (sig[:, 1] == sig[:, 2])
    assert 0.45 < shared.float().mean() < 0.55
    assert 0.6 < sig.median() < 0.8  # shift 3 spends more of the schedule at high noise (median 0.75)


def test_bad_batches_are_named(tiny_model):
    g = torch.Generator().manual_seed(0)
    batch = _batch(tiny_model, g)
    with pytest.raises(ValueError, match="shot_frames"):
        training_loss(tiny_model, StoryBatch(batch.latents, (3, 3), batch.text), TrainingConfig())
    with pytest.raises(ValueError, match="global caption"):
        training_loss(tiny_model, StoryBatch(batch.latents, batch.shot_frames, batch.text[:1]), TrainingConfig())


def test_loss_weights_select_the_cells_that_count(tiny_model):
    """Uniform weights give the plain mean; weight on one cell alone gives that cell's error,
    which differs from the mean; a wrong shape is named."""
    g = torch.Generator().manual_seed(2)
    batch = _batch(tiny_model, g)
    B, C, F, h, w = batch.latents.shape
    cfg = TrainingConfig()
    plain = training_loss(tiny_model, batch, cfg, generator=torch.Generator().manual_seed(3))
    ones = StoryBatch(batch.latents, batch.shot_frames, batch.text, torch.full((B, F, h, w), 2.5))
    assert torch.allclose(training_loss(tiny_model, ones, cfg, generator=torch.Generator().manual_seed(3)), plain)
    spot = torch.zeros(B, F, h, w)
    spot[1, 2, 3, 4] = 1.0
    one = training_loss(tiny_model, StoryBatch(batch.latents, batch.shot_frames, batch.text, spot), cfg,
                        generator=torch.Generator().manual_seed(3))
    assert torch.isfinite(one) and not torch.allclose(one, plain)
    with pytest.raises(ValueError, match="weights must be"):
        training_loss(tiny_model, StoryBatch(batch.latents, batch.shot_frames, batch.text, spot[:, :2]), cfg)
