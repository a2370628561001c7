"""The frame codec's CPU memory layout (channels-last, for speed) changes no result."""

import copy

import torch
from diffusers import AutoencoderKL

from engine.codec import FrameVAECodec


def _vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                         layers_per_block=1, latent_channels=4, norm_num_groups=4).eval()


def test_channels_last_on_the_cpu_gives_the_default_layouts_numbers():
    vae = _vae()
    plain = copy.deepcopy(vae)
    codec = FrameVAECodec(vae, [0.1, -0.2, 0.3, 0.0], [1.5, 0.5, 2.0, 1.0], batch=3)
    frames = torch.randint(0, 256, (5, 24, 40, 3), dtype=torch.uint8)  # 5 frames: batches of 3 and 2
    latents = codec.encode(frames)
    conv = next(p for p in vae.parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)  # the fast layout is in use
    with torch.no_grad():
        x = frames.permute(0, 3, 1, 2).float() / 127.5 - 1
        z = plain.encode(x).latent_dist.mode()
        expected = (z - codec.mean[:, 0][None]) / codec.std[:, 0][None]
        torch.testing.assert_close(latents.permute(1, 0, 2, 3), expected, rtol=1e-4, atol=1e-4)
        back = plain.decode(z).sample
    decoded = codec.decode(latents)  # (T, H, W, 3) uint8
    assert decoded.shape == frames.shape and decoded.is_contiguous()
    want = ((back.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1)
    assert (decoded.float() - want).abs().max() <= 1  # rounding at a .5 boundary at most
