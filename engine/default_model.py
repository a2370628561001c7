"""The shipped default model's recipe: a small Wan transformer, MiniLM text, the pixel codec.

For: `DEFAULT_TRANSFORMER` (the backbone config the default model and a future training script
share) and `write_default_model(folder, seed)`, which writes a deterministic random-initialised
model folder (assets/default_model). Until the trained default exists, that folder is what the
CLI and the app run: its videos are noise-like colour fields, not stories.
Not for: loading (model.py) or training.

Regenerate the shipped folder with:
  python -c "from engine.default_model import write_default_model; write_default_model('assets/default_model')"
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

DEFAULT_TRANSFORMER = dict(  # diffusers WanTransformer3DModel config of the default model
    patch_size=(1, 2, 2),  # (t, h, w) latent cells per token
    num_attention_heads=2,  # heads (few: on the CPU attention cost grows with heads x tokens^2)
    attention_head_dim=32,  # channels per head (RoPE: 12 time, 10 height, 10 width)
    in_channels=3,  # pixel codec latents are RGB
    out_channels=3,
    text_dim=384,  # MiniLM token states
    freq_dim=64,  # sinusoidal timestep features
    ffn_dim=128,  # feed-forward width
    num_layers=4,  # transformer blocks
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,  # max latent frames in a story
)
DEFAULT_CODEC = {"type": "pixel", "spatial": 8}  # 128x192 video -> 16x24 latent -> 8x12 = 96 tokens per frame
DEFAULT_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


def write_default_model(folder: str | Path, seed: int = 0, transformer: dict | None = None,
                        codec: dict | None = None, scheduler: dict | None = None) -> Path:
    """Write a random-initialised storyboard model folder (overrides: tests build tiny ones)."""
    from diffusers import WanTransformer3DModel
    folder = Path(folder)
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)  # diffusers initialises from the global RNG; restored below
        model = WanTransformer3DModel(**{**DEFAULT_TRANSFORMER, **(transformer or {})})
    finally:
        torch.random.set_rng_state(gen_state)
    model.save_pretrained(folder / "transformer", safe_serialization=True)
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler or DEFAULT_SCHEDULER, indent=2) + "\n")
    manifest = {"format": 1, "description": "random-initialised default, untrained", "trained": False,
                "seed": seed, "text_encoder": "all-MiniLM-L6-v2", "codec": codec or DEFAULT_CODEC}
    (folder / "storyboard.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


__all__ = ["DEFAULT_TRANSFORMER", "DEFAULT_CODEC", "DEFAULT_SCHEDULER", "write_default_model"]
