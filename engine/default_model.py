"""The default model's recipe: a small Wan transformer, MiniLM text, a learned frame codec.

For: `DEFAULT_TRANSFORMER` and `DEFAULT_VAE` (the configs the trainer builds and the shipped
assets/default_model holds, see engine/trainer.py and assets/default_model/MODEL_CARD.md),
the frame size it was trained at, and `write_default_model(folder, seed)`, which writes a
deterministic random-initialised model folder with the pixel codec (tests build tiny ones).
Not for: loading (model.py) or training (trainer.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

HEIGHT, WIDTH = 128, 192  # frame size the default model is trained at (32 x 48 latent cells)
DEFAULT_TRANSFORMER = dict(  # diffusers WanTransformer3DModel config of the trained default model
    patch_size=(1, 4, 4),  # (t, h, w) latent cells per token: 8 x 12 = 96 tokens per frame
    num_attention_heads=4,  # heads
    attention_head_dim=64,  # channels per head (a head dim the fused Triton kernels take)
    in_channels=4,  # frame-codec latent channels
    out_channels=4,
    text_dim=384,  # MiniLM token states
    freq_dim=256,  # sinusoidal timestep features
    ffn_dim=1024,  # feed-forward width
    num_layers=8,  # transformer blocks (9.1M parameters, 17.4 MiB in fp16)
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,  # max latent frames in a story
)
DEFAULT_VAE = dict(  # diffusers AutoencoderKL config of the frame codec
    in_channels=3,
    out_channels=3,
    # two 2x downsamples: 4x smaller per side. Three (8x, 16 x 24 cells) measured 27-30 dB PSNR on
    # the H100 and lost the dots pattern and small shapes' corners; 4x keeps them
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 128),
    layers_per_block=1,
    latent_channels=4,
    # 8 groups: with 32 on the 32-channel first block every GroupNorm there normalised each channel
    # alone over the frame, removing a flat-colour frame's colours (each channel's mean); the first
    # GPU run's codec shifted colours and lost 74 % of the characters' looks (docs/training)
    norm_num_groups=8,
)
PIXEL_TRANSFORMER = dict(  # the random pixel-codec recipe (tests): RGB latents, small
    DEFAULT_TRANSFORMER, patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=3, out_channels=3,
    freq_dim=64, ffn_dim=128, num_layers=4)
DEFAULT_CODEC = {"type": "pixel", "spatial": 8}  # 128x192 video -> 16x24 latent -> 8x12 = 96 tokens per frame
DEFAULT_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


def write_default_model(folder: str | Path, seed: int = 0, transformer: dict | None = None,
                        codec: dict | None = None, scheduler: dict | None = None) -> Path:
    """Write a random-initialised storyboard model folder with the pixel codec (overrides: tests
    build tiny ones)."""
    from diffusers import WanTransformer3DModel
    folder = Path(folder)
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)  # diffusers initialises from the global RNG; restored below
        model = WanTransformer3DModel(**{**PIXEL_TRANSFORMER, **(transformer or {})})
    finally:
        torch.random.set_rng_state(gen_state)
    model.save_pretrained(folder / "transformer", safe_serialization=True)
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler or DEFAULT_SCHEDULER, indent=2) + "\n")
    manifest = {"format": 1, "description": "random-initialised default, untrained", "trained": False,
                "seed": seed, "text_encoder": "all-MiniLM-L6-v2", "codec": codec or DEFAULT_CODEC}
    (folder / "storyboard.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


def write_recipe_model(folder: str | Path, seed: int = 0) -> Path:
    """The trained default's architecture (DEFAULT_TRANSFORMER, the DEFAULT_VAE frame codec) with
    random weights, in fp16 safetensors, marked untrained: for timing the CPU budget before (or
    without) training; compute does not depend on the weights' values."""
    from diffusers import AutoencoderKL, WanTransformer3DModel
    folder = Path(folder)
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        transformer, vae = WanTransformer3DModel(**DEFAULT_TRANSFORMER), AutoencoderKL(**DEFAULT_VAE)
    finally:
        torch.random.set_rng_state(gen_state)
    transformer.half().save_pretrained(folder / "transformer", safe_serialization=True)
    vae.half().save_pretrained(folder / "vae", safe_serialization=True)
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(DEFAULT_SCHEDULER, indent=2) + "\n")
    channels = DEFAULT_VAE["latent_channels"]
    manifest = {"format": 2, "description": "the trained default's architecture, random weights", "trained": False,
                "seed": seed, "text_encoder": "all-MiniLM-L6-v2",
                "codec": {"type": "frame-vae", "latent_mean": [0.0] * channels, "latent_std": [1.0] * channels,
                          "preview_rgb": [[0.0, 0.0, 0.0]] * channels + [[0.5, 0.5, 0.5]]}}
    (folder / "storyboard.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


__all__ = ["DEFAULT_TRANSFORMER", "DEFAULT_VAE", "PIXEL_TRANSFORMER", "HEIGHT", "WIDTH", "DEFAULT_CODEC",
           "DEFAULT_SCHEDULER", "write_default_model", "write_recipe_model"]
