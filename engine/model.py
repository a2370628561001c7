"""A loaded story model: backbone + text encoder + codec + scheduler config + identity.

For: `StoryModel.load(path, device, dtype)` from either the shipped default folder (a
`storyboard.json` manifest, a small Wan transformer, MiniLM text, the pixel codec) or a local
diffusers-format Wan2.1 text-to-video checkpoint (model_index.json, transformer/, vae/,
text_encoder/, tokenizer/, scheduler/), offline, safetensors only; `new_scheduler()` for a fresh
scheduler per sampling run; `identity`, the content hash that shot-cache keys start from.
Not for: sampling (sampler.py) or building the default weights (default_model.py).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from engine.backbone import StoryTransformer

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "default_model"
SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler")  # flow-matching schedulers we drive


class ModelError(ValueError):
    """A model folder is missing, incomplete or of an unsupported kind (the message says which)."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ModelError(f"device must be auto, cpu, cuda or cuda:N, got {str(device)[:60]!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ModelError(f"device must be auto, cpu, cuda or cuda:N, got {str(device)[:60]!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {str(device)!r} was asked for but no CUDA GPU is visible; use --device cpu")
    return dev


def _fingerprint_file(path: Path, h: "hashlib._Hash") -> None:
    """Name, size, and the first and last MiB: fast for multi-GB weights, changes when they do."""
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(size - (1 << 20))
            h.update(f.read(1 << 20))


def model_identity(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix in (".json", ".safetensors", ".txt", ".model"):
            h.update(str(p.relative_to(folder)).encode())
            _fingerprint_file(p, h)
    return h.hexdigest()[:32]


@dataclass
class StoryModel:
    name: str  # shown to users: folder name and kind
    identity: str  # content hash of the folder (cache keys start from it)
    transformer: StoryTransformer  # the backbone with MoC processors installed
    text_encoder: object  # text.MiniLMEncoder | text.UMT5Encoder
    codec: object  # codec.PixelCodec | codec.WanVAECodec
    scheduler_class: type  # a diffusers flow-matching scheduler
    scheduler_config: dict  # its config (a fresh scheduler per run: multistep schedulers keep state)
    device: torch.device
    dtype: torch.dtype  # transformer compute dtype
    trained: bool  # False for a random-initialised model (tests, the recipe)
    caveat: str = ""  # what the model cannot do yet, from storyboard.json "caveat" (shown to the user)

    def new_scheduler(self):
        return self.scheduler_class.from_config(self.scheduler_config)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config.get("num_train_timesteps", 1000))

    @staticmethod
    def load(path: str | Path | None = None, device: str | torch.device = "auto",
             dtype: torch.dtype | None = None) -> "StoryModel":
        folder = Path(path) if path is not None else DEFAULT_MODEL_DIR
        if not folder.is_dir():
            raise ModelError(f"model folder {str(folder)!r} does not exist")
        dev = resolve_device(device)
        try:
            if (folder / "storyboard.json").is_file():
                return _load_default(folder, dev, dtype)
            if (folder / "model_index.json").is_file():
                return _load_wan(folder, dev, dtype)
        except ModelError:
            raise
        except Exception as err:  # malformed files: a truncated shard, a config that is not JSON, ...
            if isinstance(err, MemoryError):
                raise
            detail = str(err).splitlines()[0][:300] if str(err) else ""
            raise ModelError(f"cannot load the model in {str(folder)!r}: {type(err).__name__}: {detail} "
                             "(re-copy the folder, or drop --model to use the shipped default)") from err
        raise ModelError(f"{str(folder)!r} is neither a storyboard model (storyboard.json) nor a diffusers "
                         "Wan checkpoint (model_index.json)")


def _load_scheduler(folder: Path) -> tuple[type, dict]:
    import diffusers
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    if not cfg_path.is_file():
        raise ModelError(f"{str(cfg_path)!r} is missing")
    config = json.loads(cfg_path.read_text())
    name = config.get("_class_name")
    if name not in SCHEDULERS:
        raise ModelError(f"scheduler {name!r} is not supported; use one of {SCHEDULERS}")
    return getattr(diffusers, name), config


def load_shards(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's .safetensors shards (never pickle)."""
    state = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(shard))
    return state


def _from_folder(cls, sub: Path, ignore: str | None = None):
    """A diffusers module built from sub/config.json and filled from its safetensors shards; a
    key mismatch is a ModelError (unexpected keys containing `ignore` are allowed)."""
    module = cls.from_config(cls.load_config(sub))
    missing, unexpected = module.load_state_dict(load_shards(sub), strict=False)
    unexpected = [k for k in unexpected if ignore is None or ignore not in k]
    if missing or unexpected:
        raise ModelError(f"{str(sub)!r} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return module


def _load_transformer(folder: Path, device, dtype):
    from diffusers import WanTransformer3DModel
    sub = folder / "transformer"
    if not any(sub.glob("*.safetensors")):
        raise ModelError(f"{str(sub)!r} holds no .safetensors weights (only safetensors are loaded)")
    # built from its config and filled from the safetensors shards directly: diffusers'
    # from_pretrained needs `accelerate` for this class (it keeps some modules in float32)
    model = _from_folder(WanTransformer3DModel, sub, ignore="norm_added_q")  # diffusers ignores these too
    # cast, keeping in float32 what diffusers keeps in float32 (norms, time embedding, RoPE)
    if dtype != torch.float32:
        keep = set(model._keep_in_fp32_modules or ())
        for name, param in model.named_parameters():
            if not keep.intersection(name.split(".")):
                param.data = param.data.to(dtype)
    return StoryTransformer(model.to(device).eval().requires_grad_(False))


def _load_frame_vae(folder: Path, codec: dict, device):
    """The learned frame codec: vae/ (AutoencoderKL, safetensors) + the manifest's latent statistics."""
    from diffusers import AutoencoderKL
    from engine.codec import FrameVAECodec
    sub = folder / "vae"
    if not (sub / "config.json").is_file() or not any(sub.glob("*.safetensors")):
        raise ModelError(f"{str(sub)!r} must hold config.json and .safetensors weights of the frame codec")
    for key in ("latent_mean", "latent_std"):
        if not isinstance(codec.get(key), list):
            raise ModelError(f"storyboard.json in {str(folder)!r}: codec.{key} must be a list of numbers")
    vae = _from_folder(AutoencoderKL, sub).float().to(device).eval().requires_grad_(False)
    return FrameVAECodec(vae, codec["latent_mean"], codec["latent_std"], codec.get("preview_rgb"))


def _load_default(folder: Path, device, dtype) -> StoryModel:
    from engine.codec import PixelCodec
    from engine.text import MiniLMEncoder
    manifest = json.loads((folder / "storyboard.json").read_text())
    if not isinstance(manifest, dict) or not isinstance(manifest.get("codec", {}), dict):
        raise ModelError(f"storyboard.json in {str(folder)!r} must be a JSON object with a codec object")
    codec = manifest.get("codec", {})
    if manifest.get("text_encoder") != "all-MiniLM-L6-v2" or codec.get("type") not in ("pixel", "frame-vae"):
        raise ModelError(f"unsupported storyboard.json in {str(folder)!r}: text_encoder must be 'all-MiniLM-L6-v2' "
                         f"and codec.type 'pixel' or 'frame-vae'")
    dtype = dtype or torch.float32
    transformer = _load_transformer(folder, device, dtype)
    scheduler_class, scheduler_config = _load_scheduler(folder)
    codec = (_load_frame_vae(folder, codec, device) if codec["type"] == "frame-vae"
             else PixelCodec(int(codec["spatial"])))
    return StoryModel(name=f"{folder.name} ({manifest.get('description', 'storyboard model')})",
                      identity=model_identity(folder), transformer=transformer,
                      text_encoder=MiniLMEncoder.load(device), codec=codec,
                      scheduler_class=scheduler_class, scheduler_config=scheduler_config, device=device,
                      dtype=dtype, trained=bool(manifest.get("trained", False)),
                      caveat=str(manifest.get("caveat", "")))


def _load_wan(folder: Path, device, dtype) -> StoryModel:
    from diffusers import AutoencoderKLWan
    from engine.codec import WanVAECodec
    from engine.text import UMT5Encoder
    index = json.loads((folder / "model_index.json").read_text())
    for part in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        if part not in index or not (folder / part).is_dir():
            raise ModelError(f"{str(folder)!r} lacks the {part!r} component of a Wan text-to-video checkpoint")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    transformer = _load_transformer(folder, device, dtype)
    vae = AutoencoderKLWan.from_pretrained(folder / "vae", local_files_only=True, use_safetensors=True,
                                           torch_dtype=torch.float32).to(device)
    text = UMT5Encoder.load(folder, device, dtype)
    scheduler_class, scheduler_config = _load_scheduler(folder)
    return StoryModel(name=f"{folder.name} (Wan checkpoint)", identity=model_identity(folder),
                      transformer=transformer, text_encoder=text, codec=WanVAECodec(vae),
                      scheduler_class=scheduler_class, scheduler_config=scheduler_config, device=device,
                      dtype=dtype, trained=True)


__all__ = ["StoryModel", "ModelError", "DEFAULT_MODEL_DIR", "resolve_device", "model_identity", "load_shards"]
