"""Codecs: video frames <-> the latents the transformer denoises.

For: `FrameVAECodec` (the default model's learned codec: a small diffusers AutoencoderKL trained on
ShapeStory frames, 8x smaller per side, 1 latent frame = 1 video frame, latents normalised per
channel), `PixelCodec` (average-pooled pixels, decoded by bilinear upsampling: tests and the
untrained recipe), `WanVAECodec` (a Wan checkpoint's AutoencoderKLWan with tiling; 1 latent frame
= 4 video frames after the first), plus cheap previews of a clean estimate.
Not for: writing video files (video.py).

Shapes: latents (C, f, h, w) per shot; frames (T, H, W, 3) uint8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def video_frames_of_latent(latent_frame: int, temporal: int) -> range:
    """The video frames one latent frame decodes to: with `temporal` video frames per latent frame
    after the first (Wan: 4), latent frame 0 is video frame 0 alone and latent frame k >= 1 covers
    1 + temporal (k - 1) ... temporal k; per-frame codecs (temporal 1) map k to k."""
    if latent_frame == 0:
        return range(0, 1)
    start = 1 + temporal * (latent_frame - 1)
    return range(start, start + temporal)


def middle_video_frame(latent_frame: int, temporal: int) -> int:
    """The video frame that shows a latent frame best: the middle one of those it decodes to."""
    span = video_frames_of_latent(latent_frame, temporal)
    return span[len(span) // 2]


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """(C=3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous().cpu()


class PixelCodec:
    name = "pixel"
    temporal = 1  # video frames per latent frame

    def __init__(self, spatial: int = 8, channels: int = 3):
        self.spatial = spatial  # pixels per latent cell along each side
        self.channels = channels  # latent channels (RGB)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        return (self.channels, frames, height // self.spatial, width // self.spatial)

    def video_frames(self, latent_frames: int) -> int:
        return latent_frames

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """(T, H, W, 3) uint8 -> (3, T, h, w) latents (for training data)."""
        x = frames.permute(3, 0, 1, 2).float() / 127.5 - 1  # (3, T, H, W)
        return F.avg_pool2d(x, self.spatial)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        x = latents.float()  # (3, f, h, w): f acts as the batch of 2D upsampling
        x = F.interpolate(x.permute(1, 0, 2, 3), scale_factor=self.spatial, mode="bilinear", align_corners=False)
        return to_uint8(x.permute(1, 0, 2, 3))

    def preview(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decode(latents)


class FrameVAECodec:
    """Per-frame AutoencoderKL: frames (T, H, W, 3) <-> normalised latents (C, T, H/8, W/8).
    `preview` is a fitted linear map latent -> RGB (no decoder run: previews come every step)."""
    name = "frame-vae"
    temporal = 1

    def __init__(self, vae, mean, std, preview_rgb=None, batch: int = 16):
        self.vae = vae.eval()  # diffusers AutoencoderKL
        self.spatial = 2 ** (len(vae.config.block_out_channels) - 1)
        self.channels = int(vae.config.latent_channels)
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1, 1)  # (C, 1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1, 1)
        # (C + 1, 3): rgb = [latent, 1] @ preview_rgb, in [-1, 1]
        self.preview_rgb = None if preview_rgb is None else torch.as_tensor(preview_rgb, dtype=torch.float32)
        self.batch = batch  # frames per decoder call (bounds memory)
        self._layout_on = None  # the device the VAE's memory layout was last chosen for

    def _ready(self, x: torch.Tensor) -> torch.Tensor:
        """x on the VAE's device and dtype, in the memory layout its convolutions run fastest in
        there: channels-last on the CPU (oneDNN: decoding 8 frames 1.6 -> 1.0 s on the 2-core
        machine, the same numbers to float32 rounding), PyTorch's default elsewhere."""
        p = next(self.vae.parameters())
        fmt = torch.channels_last if p.device.type == "cpu" else torch.contiguous_format
        if self._layout_on != p.device:
            self.vae.to(memory_format=fmt)
            self._layout_on = p.device
        return x.to(p.device, p.dtype).contiguous(memory_format=fmt)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        return (self.channels, frames, height // self.spatial, width // self.spatial)

    def video_frames(self, latent_frames: int) -> int:
        return latent_frames

    @torch.no_grad()
    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) in [-1, 1] -> (n, C, h, w) normalised latents (the mode, no sampling)."""
        z = self.vae.encode(self._ready(x)).latent_dist.mode().float().contiguous()
        return (z - self.mean[:, 0].to(z.device)[None]) / self.std[:, 0].to(z.device)[None]

    @torch.no_grad()
    def decode_images(self, z: torch.Tensor) -> torch.Tensor:
        """(n, C, h, w) normalised latents -> (n, 3, H, W) in [-1, 1]."""
        z = z.float() * self.std[:, 0].to(z.device)[None] + self.mean[:, 0].to(z.device)[None]
        return self.vae.decode(self._ready(z)).sample.float().contiguous()

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """(T, H, W, 3) uint8 -> (C, T, h, w) latents."""
        x = frames.permute(0, 3, 1, 2).float() / 127.5 - 1  # (T, 3, H, W)
        z = torch.cat([self.encode_images(x[i:i + self.batch]) for i in range(0, x.shape[0], self.batch)])
        return z.permute(1, 0, 2, 3).cpu()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(C, f, h, w) latents -> (f, H, W, 3) uint8."""
        z = latents.permute(1, 0, 2, 3)  # (f, C, h, w)
        x = torch.cat([self.decode_images(z[i:i + self.batch]).cpu() for i in range(0, z.shape[0], self.batch)])
        return to_uint8(x.permute(1, 0, 2, 3))

    def preview(self, latents: torch.Tensor) -> torch.Tensor:
        if self.preview_rgb is None:
            return WanVAECodec.preview(self, latents)
        z = latents.float().cpu()  # (C, f, h, w)
        rgb = torch.einsum("cfhw,cr->rfhw", z, self.preview_rgb[:-1]) + self.preview_rgb[-1].view(3, 1, 1, 1)
        x = F.interpolate(rgb.permute(1, 0, 2, 3), scale_factor=self.spatial, mode="nearest")
        return to_uint8(x.permute(1, 0, 2, 3))


class WanVAECodec:
    name = "wan-vae"

    def __init__(self, vae):
        self.vae = vae.eval()  # diffusers AutoencoderKLWan
        self.vae.enable_tiling()
        self.temporal = int(vae.config.scale_factor_temporal)
        self.spatial = int(vae.config.scale_factor_spatial)
        self.channels = int(vae.config.z_dim)
        self.mean = torch.tensor(vae.config.latents_mean).view(-1, 1, 1, 1)  # (C, 1, 1, 1)
        self.std = torch.tensor(vae.config.latents_std).view(-1, 1, 1, 1)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        return (self.channels, frames, height // self.spatial, width // self.spatial)

    def video_frames(self, latent_frames: int) -> int:
        return 1 + self.temporal * (latent_frames - 1)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        p = next(self.vae.parameters())
        z = latents.to(p.device, p.dtype) * self.std.to(p.device, p.dtype) + self.mean.to(p.device, p.dtype)
        video = self.vae.decode(z[None], return_dict=False)[0][0]  # (3, T, H, W) in [-1, 1]
        return to_uint8(video)

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        p = next(self.vae.parameters())
        x = (frames.permute(3, 0, 1, 2).float() / 127.5 - 1)[None].to(p.device, p.dtype)
        z = self.vae.encode(x).latent_dist.mode()[0]
        return ((z - self.mean.to(z)) / self.std.to(z)).float()

    def preview(self, latents: torch.Tensor) -> torch.Tensor:
        """Cheap look at a clean estimate: three latent channels, normalised, nearest-upsampled,
        one frame per latent frame (a full VAE decode every step would cost more than the step)."""
        x = latents[:3].float()
        x = x / x.abs().amax(dim=(1, 2, 3), keepdim=True).clamp(min=1e-6)
        x = F.interpolate(x.permute(1, 0, 2, 3), scale_factor=self.spatial, mode="nearest")
        return to_uint8(x.permute(1, 0, 2, 3))


__all__ = ["FrameVAECodec", "PixelCodec", "WanVAECodec", "middle_video_frame", "to_uint8", "video_frames_of_latent"]
