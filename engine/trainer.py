"""The default model's trainer: ShapeStory stories -> frame codec -> story transformer -> assets.

For: `train(config, work_dir)`, the one resumable training command behind
`scripts/train_default.py`, in three stages that each skip when their output exists:
  1. codec: a small diffusers AutoencoderKL on ShapeStory frames (L1 + MSE, tiny KL weight), then
     per-channel latent statistics and a linear latent -> RGB map for live previews;
  2. transformer: diffusers' WanTransformer3DModel trained by `engine.training.training_loss`
     (flow matching, per-shot noise levels, MoC routing with drop-off / drop-in on the fused Triton
     kernels, bf16 autocast) on batches of stories that share a shot layout, with an EMA copy,
     a JSONL loss log, periodic sample strips and checkpoints (safetensors, never pickle);
  3. export: the EMA weights in fp16 as a storyboard model folder (`export_model`).
Stories are rendered on the training device by `engine.shapestory.render.draw` (no files); the
text encoder is MiniLM, exactly as at inference.
Not for: the loss itself (training.py) or loading the result (model.py).
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from engine.default_model import DEFAULT_SCHEDULER, DEFAULT_TRANSFORMER, DEFAULT_VAE, HEIGHT, WIDTH
from engine.shapestory.render import FrameParams, draw, frame_params, look_labels
from engine.shapestory.world import HELDOUT_SEED_START, sample_story


@dataclass(frozen=True)
class TrainerConfig:
    height: int = HEIGHT  # frame height, pixels
    width: int = WIDTH  # frame width, pixels
    transformer: dict = field(default_factory=lambda: dict(DEFAULT_TRANSFORMER))  # WanTransformer3DModel config
    vae: dict = field(default_factory=lambda: dict(DEFAULT_VAE))  # AutoencoderKL config
    codec_steps: int = 2500  # codec optimiser steps
    codec_batch: int = 48  # frames per codec step
    codec_lr: float = 3e-4
    kl_weight: float = 1e-4  # keeps the latents' scale bounded
    codec_character_weight: float = 4.0  # extra codec loss weight on the characters' pixels (1 + w * coverage)
    codec_check_stories: int = 12  # held-out stories the finished codec is scored on (codec_scores)
    codec_gate: float = 0.0  # stop before the transformer if the codec keeps fewer looks than this (0: never)
    tokens_per_step: int = 49152  # video tokens per transformer step (stories per batch follow from it)
    lr: float = 4e-4  # peak transformer learning rate (AdamW)
    warmup: int = 300  # linear warm-up steps
    min_lr_ratio: float = 0.1  # cosine decay to this fraction at the end of the time budget
    ema: float = 0.9985  # EMA decay of the exported weights
    minutes: float = 20.0  # transformer training budget, wall-clock minutes (summed over resumes)
    max_steps: int = 0  # stop after this many transformer steps as well (0 = time only)
    caption_drop: float = 0.1  # probability a story trains with empty captions (guidance's unconditional)
    # how training draws noise levels: u ~ U(0, 1) through this shift (TrainingConfig.shift). 3 spends
    # 75 % of the steps above noise level 0.5, where layout is decided; 1 is uniform and gives the
    # lower levels, where a blob becomes a circle or a triangle, twice the steps. The sampler's
    # schedule (DEFAULT_SCHEDULER) does not change with it
    train_shift: float = 3.0
    # extra flow-loss weight of latent cells the characters cover (1 + w * coverage). Keep it 0: a
    # weight that depends on the clean frame biases the flow. Where the noisy input leaves open
    # whether a cell is character or background, the weighted optimum counts the character w + 1
    # times (with w = 6 a 10 % chance reads as 44 %), so samples grow character-coloured blobs
    # several times the shapes' size (runs 1 and 2, docs/training)
    character_weight: float = 0.0
    shot_weights: tuple[int, ...] = (1, 1, 2, 2, 2, 3, 3, 3)  # relative frequency of 1..8 shot stories
    frames_choices: tuple[int, ...] = (6, 8, 8, 10)  # latent frames per shot (one per batch)
    # share of training stories drawn as "focus" stories: one character, framed close in
    # `focus_close` of its shots. A character's shape decides few pixels of a wide frame, so the loss
    # barely rewards drawing the caption's shape (docs/training, run 8); a close, lone character
    # gives the shape four times the pixels. It changes which stories are drawn, not the loss, so
    # the model's optimum for a given story and caption stays the same (unlike a pixel weight)
    focus: float = 0.0
    focus_close: float = 0.7
    # the look probe (engine/training.LookProbe): a training-only head on block `look_layer` that
    # predicts each token's character shape and colour; its loss, times look_weight, joins the flow
    # loss (0: off). Not exported
    look_weight: float = 0.0
    look_layer: int = 4
    # the routing probe (engine/training.RouteProbe): a loss on MoC's routing scores that asks a
    # character's tokens to rank the earlier chunks showing the same character first, in the blocks
    # `route_layers` (empty: all), times route_weight; training only, no parameters
    route_weight: float = 0.0
    route_layers: tuple[int, ...] = ()
    route_background: float = 1.0  # a background token's weight in the probe (a character's: 5)
    # share of the multi-shot steps trained as a both-sided regeneration of one shot (open_shot_of,
    # engine/training.regeneration_step): it may route to the later shots, the others are fixed
    # context at the sampler's context noise. 0: every step is a joint / LCT step, as up to run 14
    open_shot: float = 0.0
    moc: bool = True  # MoC routing (False: dense attention, the baseline)
    backend: str = "triton"  # moc_attention backend on the GPU ("reference" on the CPU)
    moc_tile: int = 128  # query rows per kernel tile (MoCConfig.tile): speed only, the attention is the same
    compile: bool = False  # torch.compile the blocks around the attention (StoryTransformer.compile_blocks): speed only
    log_every: int = 50  # steps per loss-log record (the mean over them)
    checkpoint_minutes: float = 3.0  # transformer checkpoint period
    sample_minutes: float = 5.0  # sample strip period
    sample_steps: int = 12  # sampler steps for the sample strips
    seed: int = 0  # data and noise streams


# ---- data ------------------------------------------------------------------------------------

def _step_rng(seed: int, step: int) -> random.Random:
    return random.Random(f"{seed}:{step}")


def story_batch_plan(config: TrainerConfig, step: int) -> tuple[list, int, int]:
    """(specs, shots, frames) of training step `step`: one shot layout, several stories; seeds
    below HELDOUT_SEED_START and names from the training pool, drawn from (seed, step) alone."""
    rng = _step_rng(config.seed, step)
    shots = rng.choices(range(1, 9), weights=config.shot_weights)[0]
    frames = rng.choice(config.frames_choices)
    tokens = shots * frames * _frame_tokens(config)
    count = max(1, config.tokens_per_step // tokens)
    specs = []
    for _ in range(count):
        seed = rng.randrange(HELDOUT_SEED_START)
        if config.focus and rng.random() < config.focus:
            specs.append(sample_story(seed, num_shots=shots, frames=frames, names="train", num_characters=1,
                                      close_up=config.focus_close))
        else:
            specs.append(sample_story(seed, num_shots=shots, frames=frames, names="train"))
    return specs, shots, frames


def open_shot_of(config: TrainerConfig, step: int, shots: int) -> int | None:
    """The shot step `step` regenerates with both sides as context (None: a joint / LCT step):
    with probability config.open_shot, one of the shots that have a later one, uniformly. From
    (seed, step) alone, on a stream of its own: the stories a step draws do not change with it."""
    if shots < 2 or config.open_shot <= 0:
        return None
    rng = random.Random(f"{config.seed}:{step}:open")
    return rng.randrange(shots - 1) if rng.random() < config.open_shot else None


def _frame_tokens(config: TrainerConfig) -> int:
    down = 2 ** (len(config.vae["block_out_channels"]) - 1)
    _, ph, pw = config.transformer["patch_size"]
    return (config.height // down // ph) * (config.width // down // pw)


def _prepare(config: TrainerConfig, step: int, text=None, stream=None):
    """The side of a step that needs no training state (runs in a worker thread, a step ahead):
    stories, frame parameters, captions and, with `text` (an encoder of this thread's own), the
    captions' token states on the host (else None). On the GPU the text encoder runs on `stream`, so that
    bringing its states back waits for it alone, and only in this thread: the training thread
    keeps queueing its step meanwhile."""
    specs, shots, frames = story_batch_plan(config, step)
    params = FrameParams.cat([frame_params(s, config.height, config.width) for s in specs])
    rng = _step_rng(config.seed + 1, step)
    captions = []
    for s in specs:
        if rng.random() < config.caption_drop:
            captions.append([""] * (shots + 1))
        else:
            captions.append([s.global_caption] + [sh.caption for sh in s.shots])
    states = None
    if text is not None:
        with torch.cuda.stream(stream):  # None: the current stream (a no-op, also on the CPU)
            states = _text(text, captions)
    return specs, shots, frames, params, captions, states


def random_frames(config: TrainerConfig, count: int, rng: random.Random, device, with_mask: bool = False):
    """`count` frames of random stories (codec training), (count, 3, H, W) in [-1, 1]; with_mask:
    also the characters' coverage (count, 1, H, W) in [0, 1]."""
    parts, n = [], 0
    while n < count:
        spec = sample_story(rng.randrange(HELDOUT_SEED_START), frames=rng.choice((2, 4, 8)), names="train")
        p = frame_params(spec, config.height, config.width)
        parts.append(p)
        n += p.radius.shape[0]
    p = FrameParams.cat(parts)
    pick = torch.tensor(rng.sample(range(p.radius.shape[0]), count))
    p = FrameParams(*(getattr(p, f)[pick] for f in FrameParams.__dataclass_fields__))
    if with_mask:
        x, cover = draw(p, config.height, config.width, device, with_mask=True)
        return x * 2 - 1, cover
    return draw(p, config.height, config.width, device) * 2 - 1


# ---- small helpers -------------------------------------------------------------------------------

def _log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


def _save_atomic(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    tmp.replace(path)


def _write_json_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


# ---- stage 1: codec ------------------------------------------------------------------------------

def train_codec(config: TrainerConfig, work: Path, device, codec_from: Path | None = None) -> None:
    """Stage 1. codec_from: a storyboard model folder whose frame codec (weights, latent
    statistics, preview map) is taken instead of training one; it is scored like a trained one."""
    from diffusers import AutoencoderKL
    out = work / "codec"
    if (out / "codec.json").is_file():
        print("codec: done already, skipping", flush=True)
        return
    if codec_from is not None:
        import_codec(config, Path(codec_from), work, device)
        return
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    vae = AutoencoderKL(**config.vae).to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=config.codec_lr, weight_decay=0.0)
    rng = random.Random(f"codec:{config.seed}")
    started = time.time()
    amp = device.type == "cuda"
    for step in range(1, config.codec_steps + 1):
        lr = config.codec_lr * min(1.0, step / 100) * (0.5 + 0.5 * math.cos(math.pi * step / config.codec_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        x, cover = random_frames(config, config.codec_batch, rng, device, with_mask=True)
        weight = 1 + config.codec_character_weight * cover  # characters are a few percent of the pixels
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            post = vae.encode(x).latent_dist
            # the mode, not a sample: a unit-variance sample at the start drowns the latents in
            # noise and the decoder learns blur; the KL term still bounds the latents' scale
            rec = vae.decode(post.mode()).sample.float()
        kl = post.kl().mean() / x[0].numel()
        err = rec - x
        loss = (weight * (err.abs() + err * err)).mean() / weight.mean() + config.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == 1:
            psnr = -10 * math.log10(F.mse_loss(rec.detach().clamp(-1, 1), x).item() / 4 + 1e-12)
            _log(work / "codec_log.jsonl", {"stage": "codec", "step": step, "loss": round(loss.item(), 5),
                                            "psnr": round(psnr, 2), "lr": lr, "seconds": round(time.time() - started, 1)})
    vae.eval()
    # latent statistics and the preview map, from fresh frames
    zs, xs = [], []
    with torch.no_grad():
        for _ in range(16):
            x = random_frames(config, 64, rng, device)
            zs.append(vae.encode(x).latent_dist.mode().float())
            xs.append(F.avg_pool2d(x, 2 ** (len(config.vae["block_out_channels"]) - 1)))
    z, x = torch.cat(zs), torch.cat(xs)  # (n, C, h, w), (n, 3, h, w)
    mean, std = z.mean(dim=(0, 2, 3)), z.std(dim=(0, 2, 3))
    zn = ((z - mean[None, :, None, None]) / std[None, :, None, None]).permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    A = torch.cat([zn, torch.ones(zn.shape[0], 1, device=zn.device)], 1)  # (P, C + 1)
    preview_rgb = torch.linalg.lstsq(A.cpu(), x.permute(0, 2, 3, 1).reshape(-1, 3).cpu()).solution  # (C + 1, 3)
    _write_reconstructions(vae, config, rng, device, work / "codec_reconstructions.png")
    from engine.codec import FrameVAECodec
    scores = codec_scores(FrameVAECodec(vae.requires_grad_(False), mean.tolist(), std.tolist(), preview_rgb.tolist()),
                          config.codec_check_stories, config.height, config.width)
    print(f"codec: {scores['psnr_db']} dB, looks kept {scores['look_ok']:.1%} of {scores['appearances']} "
          "held-out appearances", flush=True)
    _save_atomic(vae.state_dict(), out / "vae.safetensors")
    _write_json_atomic({"latent_mean": mean.tolist(), "latent_std": std.tolist(),
                        "preview_rgb": preview_rgb.tolist(), "steps": config.codec_steps,
                        "seconds": round(time.time() - started, 1), "check": scores}, out / "codec.json")


def import_codec(config: TrainerConfig, model: Path, work: Path, device) -> None:
    """work/codec from a storyboard model folder's vae/ and codec statistics (a later run reuses a
    codec that passed its check instead of spending GPU time on a new one)."""
    from diffusers import AutoencoderKL
    from engine.codec import FrameVAECodec
    from engine.model import load_shards
    manifest = json.loads((model / "storyboard.json").read_text())
    codec = manifest.get("codec", {})
    if codec.get("type") != "frame-vae":
        raise ValueError(f"{model} has no frame codec to reuse (codec type {codec.get('type')!r})")
    vae = AutoencoderKL(**config.vae)
    vae.load_state_dict({k: v.float() for k, v in load_shards(model / "vae").items()})  # strict: same config
    vae = vae.to(device).eval().requires_grad_(False)
    scores = codec_scores(FrameVAECodec(vae, codec["latent_mean"], codec["latent_std"], codec["preview_rgb"]),
                          config.codec_check_stories, config.height, config.width)
    print(f"codec from {model}: {scores['psnr_db']} dB, looks kept {scores['look_ok']:.1%} of "
          f"{scores['appearances']} held-out appearances", flush=True)
    out = work / "codec"
    out.mkdir(parents=True, exist_ok=True)
    _save_atomic(vae.state_dict(), out / "vae.safetensors")
    training = manifest.get("training", {})
    _write_json_atomic({"latent_mean": codec["latent_mean"], "latent_std": codec["latent_std"],
                        "preview_rgb": codec["preview_rgb"], "steps": training.get("codec_steps", 0),
                        "seconds": round(60 * training.get("codec_minutes", 0.0), 1), "check": scores,
                        "from": str(model)}, out / "codec.json")


@torch.no_grad()
def codec_scores(codec, stories: int, height: int = HEIGHT, width: int = WIDTH) -> dict:
    """Held-out ground-truth stories through the codec (encode -> decode), scored by the ShapeStory
    scorer: mean PSNR, the share of character appearances that keep their look (look_ok) and
    motion, and the stories' mean adherence. `benchmarks/codec.py` reports these."""
    import numpy as np

    from engine.shapestory.render import story_frames
    from engine.shapestory.score import score_story
    looks, motions, psnrs, adherence = [], [], [], []
    for i in range(stories):
        spec = sample_story(HELDOUT_SEED_START + 500_000 + i, num_shots=2 + i % 3, frames=8)
        truth = story_frames(spec, height, width)  # (S, F, H, W, 3) uint8
        coded = [codec.decode(codec.encode(truth[s])).cpu().numpy() for s in range(truth.shape[0])]
        for s, frames in enumerate(coded):
            mse = np.mean((frames.astype(np.float64) - truth[s].numpy()) ** 2)
            psnrs.append(10 * math.log10(255 ** 2 / max(mse, 1e-9)))
        score = score_story(spec, coded)
        adherence.append(score.adherence)
        apps = [a for shot in score.shots for a in shot.appearances]
        looks += [bool(a.look_ok) for a in apps]
        motions += [bool(a.motion_ok) for a in apps]
    return {"psnr_db": round(float(np.mean(psnrs)), 2), "look_ok": round(float(np.mean(looks)), 4) if looks else None,
            "motion_ok": round(float(np.mean(motions)), 4) if motions else None,
            "adherence": round(float(np.mean(adherence)), 4), "appearances": len(looks)}


def check_codec_gate(config: TrainerConfig, work: Path) -> None:
    """Raise if the finished codec keeps fewer characters' looks than config.codec_gate: a
    transformer on a codec that loses the characters cannot draw them."""
    if not config.codec_gate:
        return
    kept = json.loads((work / "codec" / "codec.json").read_text()).get("check", {}).get("look_ok")
    if kept is None or kept < config.codec_gate:
        raise RuntimeError(f"the codec keeps {kept} of the characters' looks, below the gate {config.codec_gate}: "
                           f"train it longer (--codec-steps) or change DEFAULT_VAE, after removing {work / 'codec'}")


@torch.no_grad()
def _write_reconstructions(vae, config: TrainerConfig, rng: random.Random, device, path: Path) -> None:
    """Ground-truth frames (top) and their encode -> decode (bottom), for the model card."""
    import cv2
    x = random_frames(config, 8, rng, device)
    rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.float().clamp(-1, 1)
    img = torch.cat([torch.cat(list(x), 2), torch.cat(list(rec), 2)], 1)  # (3, 2H, 8W)
    img = ((img + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    cv2.imwrite(str(path), img[..., ::-1])


def load_codec(config: TrainerConfig, work: Path, device):
    from diffusers import AutoencoderKL
    from engine.codec import FrameVAECodec
    meta = json.loads((work / "codec" / "codec.json").read_text())
    vae = AutoencoderKL(**config.vae)
    vae.load_state_dict(load_file(work / "codec" / "vae.safetensors"))
    return FrameVAECodec(vae.to(device).eval().requires_grad_(False), meta["latent_mean"], meta["latent_std"],
                         meta["preview_rgb"])


# ---- stage 2: transformer --------------------------------------------------------------------------

def _lr_at(config: TrainerConfig, step: int, elapsed: float) -> float:
    frac = min(1.0, elapsed / (config.minutes * 60))
    cos = config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
    return config.lr * min(1.0, step / config.warmup) * cos


def _optimizer_tensors(opt: torch.optim.Optimizer, params: list) -> dict:
    out = {}
    for i, p in enumerate(params):
        st = opt.state.get(p)
        if st:
            out[f"exp_avg.{i}"], out[f"exp_avg_sq.{i}"] = st["exp_avg"], st["exp_avg_sq"]
            out[f"step.{i}"] = torch.as_tensor(st["step"]).float().reshape(1)
    return out


def _load_optimizer(opt: torch.optim.Optimizer, params: list, tensors: dict, device) -> None:
    for i, p in enumerate(params):
        if f"exp_avg.{i}" in tensors:
            opt.state[p] = {"exp_avg": tensors[f"exp_avg.{i}"].to(device),
                            "exp_avg_sq": tensors[f"exp_avg_sq.{i}"].to(device),
                            "step": tensors[f"step.{i}"].reshape(()).clone()}


def _text(encoder, captions: list[list[str]]) -> list[list[torch.Tensor]]:
    flat = encoder.encode([c for story in captions for c in story])
    out, i = [], 0
    for story in captions:
        out.append(flat[i:i + len(story)])
        i += len(story)
    if len(encoder._memo) > 50_000:  # captions rarely repeat: keep the memo bounded
        encoder._memo.clear()
    return out


def training_config(config: TrainerConfig, device):
    """The loss's settings (engine/training.py) for this run on `device`."""
    from engine.moc import MoCConfig
    from engine.training import TrainingConfig
    backend = config.backend if torch.device(device).type == "cuda" else "reference"
    if config.open_shot and not config.moc:
        raise ValueError("open_shot (both-sided regeneration steps) needs MoC routing: the dense baseline has none")
    return TrainingConfig(moc=MoCConfig(tile=config.moc_tile) if config.moc else None, backend=backend,
                          shift=config.train_shift, look_weight=config.look_weight,
                          route_weight=config.route_weight)


def _token_cell(config: TrainerConfig) -> int:
    """Pixels per token side (codec downsampling x patch)."""
    down = 2 ** (len(config.vae["block_out_channels"]) - 1)
    _, ph, pw = config.transformer["patch_size"]
    if ph != pw:
        raise ValueError(f"the look probe needs square patches, got {ph} x {pw}")
    return down * ph


def make_look_probe(config: TrainerConfig, device):
    """The run's look probe (None when config.look_weight is 0)."""
    from engine.training import LookProbe
    if not config.look_weight:
        return None
    layers = config.transformer["num_layers"]
    if not 0 <= config.look_layer < layers:
        raise ValueError(f"look_layer {config.look_layer} is not a block of the {layers}-layer transformer")
    _token_cell(config)
    dim = config.transformer["num_attention_heads"] * config.transformer["attention_head_dim"]
    return LookProbe(dim, config.look_layer).to(device)


def make_route_probe(config: TrainerConfig):
    """The run's routing probe (None when config.route_weight is 0)."""
    from engine.training import RouteProbe
    if not config.route_weight:
        return None
    if not config.moc:
        raise ValueError("the routing probe trains MoC's routing: it needs MoC attention (not --dense)")
    layers = config.transformer["num_layers"]
    bad = [i for i in config.route_layers if not 0 <= i < layers]
    if bad:
        raise ValueError(f"route layers {bad} are not blocks of the {layers}-layer transformer")
    _token_cell(config)
    return RouteProbe(tuple(config.route_layers) or None, background_weight=config.route_background)


def train_transformer(config: TrainerConfig, work: Path, device, text_folder: Path | None = None,
                      init_from: Path | None = None) -> None:
    """Train until config.minutes of training time (summed over resumes) or config.max_steps.
    init_from: a storyboard model folder whose transformer starts the run (a warm restart)."""
    from diffusers import WanTransformer3DModel
    from engine.backbone import StoryTransformer
    from engine.text import MiniLMEncoder
    from engine.training import StoryBatch, training_loss

    ckpt = work / "ckpt"
    ckpt.mkdir(parents=True, exist_ok=True)
    codec = load_codec(config, work, device)
    text = MiniLMEncoder.load(device, text_folder)
    text.model.float()
    torch.manual_seed(config.seed)
    model = WanTransformer3DModel(**config.transformer).to(device)
    state = {"step": 0, "elapsed": 0.0}
    if (ckpt / "state.json").is_file():
        state = json.loads((ckpt / "state.json").read_text())
        model.load_state_dict(load_file(ckpt / "model.safetensors"))
        print(f"resuming at step {state['step']} ({state['elapsed'] / 60:.1f} min trained)", flush=True)
    elif init_from is not None:
        from engine.model import load_shards
        model.load_state_dict({k: v.float() for k, v in load_shards(Path(init_from) / "transformer").items()})
        print(f"warm start from {init_from}", flush=True)
    ema = copy.deepcopy(model).requires_grad_(False)
    if (ckpt / "ema.safetensors").is_file():
        ema.load_state_dict(load_file(ckpt / "ema.safetensors"))
    tr = StoryTransformer(model.train())
    if config.compile:
        tr.compile_blocks()  # the EMA copy above stays eager: it only samples
    probe = make_look_probe(config, device)
    router = make_route_probe(config)
    if probe is not None and (ckpt / "look_probe.safetensors").is_file():
        probe.load_state_dict(load_file(ckpt / "look_probe.safetensors"))
    params = [p for p in model.parameters() if p.requires_grad] + ([] if probe is None else list(probe.parameters()))
    opt = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.99), weight_decay=0.01)
    if (ckpt / "optimizer.safetensors").is_file():
        _load_optimizer(opt, params, load_file(ckpt / "optimizer.safetensors"), device)
    tcfg = training_config(config, device)
    ema_params = [p for p in ema.parameters()]
    model_params = list(model.parameters())
    pool = ThreadPoolExecutor(1)
    ahead = (text.for_another_thread(), torch.cuda.Stream(device) if device.type == "cuda" else None)
    step = state["step"]
    pending = pool.submit(_prepare, config, step + 1, *ahead)
    last_ckpt = last_sample = time.time()
    window, window_t, probe_window, route_window = [], time.time(), [], []
    open_steps = 0  # both-sided regeneration steps in the log window (config.open_shot)
    amp = device.type == "cuda"
    while state["elapsed"] < config.minutes * 60 and not (config.max_steps and step >= config.max_steps):
        t0 = time.time()
        step += 1
        specs, shots, frames, fparams, captions, states = pending.result()
        pending = pool.submit(_prepare, config, step + 1, *ahead)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            weighted = bool(config.character_weight)  # the characters' coverage only when the loss uses it
            drawn = draw(fparams, config.height, config.width, device, with_mask=weighted)  # (B*S*F, 3 | 1, H, W)
            x, cover = drawn if weighted else (drawn, None)
            x = x * 2 - 1
            z = torch.cat([codec.encode_images(x[i:i + 256]) for i in range(0, x.shape[0], 256)])
        B = len(specs)
        z = z.float().view(B, shots * frames, *z.shape[1:]).permute(0, 2, 1, 3, 4)  # (B, C, F, h, w)
        weights = None
        if weighted:
            cover = F.adaptive_avg_pool2d(cover.float(), z.shape[-2:]).view(B, shots * frames, *z.shape[-2:])
            weights = 1 + config.character_weight * cover
        look = None
        if probe is not None or router is not None:
            cell = _token_cell(config)
            shape, colour = look_labels(fparams, cell, config.height, config.width, device)
            look = (shape.view(B, shots * frames, *shape.shape[1:]), colour.view(B, shots * frames, *colour.shape[1:]))
        batch = StoryBatch(z, (frames,) * shots, states, weights, look)
        gen = torch.Generator(device=device).manual_seed(config.seed * 1_000_003 + step)
        lr = _lr_at(config, step, state["elapsed"])
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            opened = open_shot_of(config, step, shots)
            loss = training_loss(tr, batch, tcfg, generator=gen, look_probe=probe, route_probe=router,
                                 open_shot=opened)
        open_steps += opened is not None
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(config.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema_params, model_params, 1 - decay)
        window.append(loss.detach())  # read at the log step: no per-step wait for the GPU
        if probe is not None and probe.last is not None:
            probe_window.append(torch.stack(probe.last).float())
        if router is not None and router.last is not None:
            route_window.append(router.last.float())
        state["elapsed"] += time.time() - t0
        state["step"] = step
        if step % config.log_every == 0 or step == 1:
            dt = (time.time() - window_t) / max(len(window), 1)
            losses = torch.stack(window).float().tolist()
            _log(work / "train_log.jsonl", {"stage": "transformer", "step": step, "loss": round(sum(losses) / len(losses), 5),
                                            "grad_norm": round(float(gnorm), 3), "lr": round(lr, 7),
                                            "stories": B, "shots": shots, "frames": frames,
                                            "sec_per_step": round(dt, 4), "minutes": round(state["elapsed"] / 60, 2),
                                            **_probe_record(probe_window, config.look_weight, losses,
                                                            route_window, config.route_weight),
                                            **({"open_steps": open_steps} if config.open_shot else {})})
            window, window_t, probe_window, route_window = [], time.time(), [], []
            open_steps = 0
        if time.time() - last_ckpt > config.checkpoint_minutes * 60:
            save_checkpoint(ckpt, model, ema, opt, params, state, probe)
            # the EMA as a small fp16 model folder too: what a cut-off GPU session brings back and
            # what a later run warm-starts from (--init-from)
            export_model(config, work, work / "model_latest")
            last_ckpt = time.time()
        if time.time() - last_sample > config.sample_minutes * 60:
            write_sample(config, work, ema, text, codec, device, step)
            last_sample = time.time()
    pool.shutdown(wait=False, cancel_futures=True)
    save_checkpoint(ckpt, model, ema, opt, params, state, probe)
    write_sample(config, work, ema, text, codec, device, step)


def _probe_record(window: list, weight: float, losses: list[float], route_window: list | None = None,
                  route_weight: float = 0.0) -> dict:
    """The probes' mean losses over a log window (the look probe's shape cross-entropy and colour
    error, the routing probe's cross-entropy), and the flow loss without the probes' parts (the
    record's "loss" is the sum the optimiser saw); empty without a probe."""
    if not window and not route_window:
        return {}
    out, flow = {}, sum(losses) / max(len(losses), 1)
    if window:
        ce, mse = torch.stack(window).mean(0).tolist()
        flow -= weight * (ce + mse)
        out.update(look_shape_ce=round(ce, 4), look_colour_mse=round(mse, 5))
    if route_window:
        route = float(torch.stack(route_window).mean())
        flow -= route_weight * route
        out["route_ce"] = round(route, 4)
    return {"flow_loss": round(flow, 5), **out}


def save_checkpoint(ckpt: Path, model, ema, opt, params, state: dict, probe=None) -> None:
    if probe is not None:  # before the optimizer state, which indexes its parameters too
        _save_atomic(probe.state_dict(), ckpt / "look_probe.safetensors")
    _save_atomic(model.state_dict(), ckpt / "model.safetensors")
    _save_atomic(ema.state_dict(), ckpt / "ema.safetensors")
    _save_atomic(_optimizer_tensors(opt, params), ckpt / "optimizer.safetensors")
    _write_json_atomic(state, ckpt / "state.json")  # last: a checkpoint counts once its state is written
    print(f"checkpoint at step {state['step']}", flush=True)


def sample_model(config: TrainerConfig, transformer_module, text, codec, device, dtype=torch.float32,
                 sampler_steps: int | None = None):
    """A StoryModel around weights in training (for sample strips)."""
    import diffusers
    from engine.backbone import StoryTransformer
    from engine.model import StoryModel
    return StoryModel(name="training sample", identity="training", transformer=StoryTransformer(transformer_module),
                      text_encoder=text, codec=codec, scheduler_class=diffusers.FlowMatchEulerDiscreteScheduler,
                      scheduler_config=dict(DEFAULT_SCHEDULER), device=device, dtype=dtype, trained=True)


@torch.no_grad()
def write_sample(config: TrainerConfig, work: Path, ema, text, codec, device, step: int) -> Path:
    """A strip per held-out story: ground truth above, the EMA model's joint render below."""
    import cv2
    import numpy as np
    from engine.sampler import Run, StorySampler
    from engine.shapestory.render import story_frames
    from engine.shapestory.world import to_story
    module = copy.deepcopy(ema).eval()
    model = sample_model(config, module, text, codec, device)
    rows = []
    for k in range(2):
        spec = sample_story(HELDOUT_SEED_START + 900_000 + k, num_shots=4, frames=8, names="heldout")
        story = to_story(spec, steps=config.sample_steps, guidance=4.0, height=config.height, width=config.width)
        sampler = StorySampler(model, story)
        latents, _, _ = sampler.sample(Run(tuple(range(len(story.shots))), tuple(s.seed for s in story.shots)))
        gt = story_frames(spec, config.height, config.width).numpy()
        for s in range(len(story.shots)):
            gen = codec.decode(latents[s]).numpy()
            rows.append(np.concatenate([np.concatenate(list(gt[s, ::2]), 1), np.concatenate(list(gen[::2]), 1)], 1))
    out = work / "samples"
    out.mkdir(exist_ok=True)
    path = out / f"step_{step:06d}.png"
    cv2.imwrite(str(path), np.concatenate(rows, 0)[..., ::-1])
    return path


# ---- stage 3: export ------------------------------------------------------------------------------

def export_model(config: TrainerConfig, work: Path, out: Path, card: dict | None = None,
                 shard_mb: int = 12) -> Path:
    """The EMA transformer and the codec in fp16 as a storyboard model folder (safetensors shards
    under `shard_mb` MiB, so each file travels and diffs within limits)."""
    from diffusers import AutoencoderKL, WanTransformer3DModel
    out = Path(out)
    meta = json.loads((work / "codec" / "codec.json").read_text())
    tr = WanTransformer3DModel(**config.transformer)
    tr.load_state_dict(load_file(work / "ckpt" / "ema.safetensors"))
    tr.half().save_pretrained(out / "transformer", safe_serialization=True, max_shard_size=f"{shard_mb}MB")
    vae = AutoencoderKL(**config.vae)
    vae.load_state_dict(load_file(work / "codec" / "vae.safetensors"))
    vae.half().save_pretrained(out / "vae", safe_serialization=True, max_shard_size=f"{shard_mb}MB")
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    _write_json_atomic(dict(DEFAULT_SCHEDULER), out / "scheduler" / "scheduler_config.json")
    state = json.loads((work / "ckpt" / "state.json").read_text())
    manifest = {"format": 2, "description": "ShapeStory default, trained", "trained": True,
                "text_encoder": "all-MiniLM-L6-v2",
                "codec": {"type": "frame-vae", "latent_mean": meta["latent_mean"], "latent_std": meta["latent_std"],
                          "preview_rgb": meta["preview_rgb"]},
                "training": {"transformer_steps": state["step"], "transformer_minutes": round(state["elapsed"] / 60, 2),
                             "codec_steps": meta["steps"], "codec_minutes": round(meta["seconds"] / 60, 2),
                             "codec_check": meta.get("check"),
                             "config": {k: v for k, v in asdict(config).items() if k not in ("transformer", "vae")},
                             **(card or {})}}
    _write_json_atomic(manifest, out / "storyboard.json")
    return out


def train(config: TrainerConfig, work: str | Path, device="cuda", text_folder: Path | None = None,
          export_to: Path | None = None, init_from: Path | None = None, codec_from: Path | None = None) -> None:
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    _write_json_atomic(asdict(config), work / "config.json")
    train_codec(config, work, dev, codec_from)
    check_codec_gate(config, work)
    train_transformer(config, work, dev, text_folder, init_from)
    if export_to is not None:
        export_model(config, work, export_to)


__all__ = ["TrainerConfig", "train", "train_codec", "import_codec", "codec_scores", "check_codec_gate", "train_transformer",
           "export_model", "story_batch_plan", "load_codec", "write_sample"]
