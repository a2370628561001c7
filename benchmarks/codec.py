"""Frame codec quality: train a codec recipe, then score its reconstructions with the scorer.

"Shapes must be recognisable after encode -> decode (measured with the benchmark's own
detector on ground-truth clips)". For each recipe this trains the codec stage of the trainer
(engine.trainer.train_codec, fresh) and measures, on held-out ground-truth stories: PSNR of
encode -> decode, and the scorer's look_ok / motion_ok / adherence on the reconstructed clips
against the same numbers on the clean clips.

Recipes: "4x" (DEFAULT_VAE: two downsamples, 32 x 48 latents for 128 x 192 frames; the
transformer patchifies 4 x 4 for 96 tokens per frame) and "8x" (three downsamples, 16 x 24
latents, patches of 2 x 2: the same token count).

Run (GPU):  python benchmarks/codec.py --recipes 8x,4x --steps 3000 [--stories 40] [--json PATH]
Run 1's codec against today's at a CPU-sized scale (docs/training):
  python benchmarks/codec.py --device cpu --recipes 4x-g32 --character-weight 0 --steps 500 \
      --height 64 --width 96 --batch 8 --stories 8 --json /tmp/g32.json
  python benchmarks/codec.py --device cpu --recipes 4x --steps 500 --height 64 --width 96 --batch 8 \
      --stories 8 --json /tmp/g8.json
A shipped codec, no training (CPU is fine):  python benchmarks/codec.py --model assets/default_model
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.default_model import DEFAULT_VAE  # noqa: E402
from engine.trainer import TrainerConfig, codec_scores, load_codec, train_codec  # noqa: E402

RECIPES = {
    "4x": DEFAULT_VAE,
    # run 1's codec: 32 GroupNorm groups, i.e. one channel a group on the 32-channel first block
    "4x-g32": dict(DEFAULT_VAE, norm_num_groups=32),
    "8x": dict(DEFAULT_VAE, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
               block_out_channels=(32, 64, 128, 128)),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default="8x,4x")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--stories", type=int, default=40)
    p.add_argument("--device", default="cuda")
    p.add_argument("--height", type=int, default=128, help="frame size the codec trains and is scored at")
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--batch", type=int, default=TrainerConfig.codec_batch, help="frames per codec step")
    p.add_argument("--character-weight", type=float, default=TrainerConfig.codec_character_weight,
                   help="extra loss weight on the characters' pixels (0: plain L1 + MSE, as in run 1)")
    p.add_argument("--model", type=Path, help="score this storyboard model folder's codec instead of training")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "codec.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    if args.model is not None:
        from engine.model import StoryModel
        codec = StoryModel.load(args.model, device=str(device)).codec
        codec.vae.float()
        rows.append({"recipe": str(args.model), "latent": list(codec.latent_shape(1, 128, 192)),
                     "parameters": sum(q.numel() for q in codec.vae.parameters()), **codec_scores(codec, args.stories)})
        print(json.dumps(rows[-1]), flush=True)
    for name in ([] if args.model is not None else args.recipes.split(",")):
        config = replace(TrainerConfig(), vae=RECIPES[name], codec_steps=args.steps, height=args.height,
                         width=args.width, codec_batch=args.batch, codec_character_weight=args.character_weight,
                         codec_check_stories=args.stories)
        with tempfile.TemporaryDirectory() as work:
            t0 = time.time()
            train_codec(config, Path(work), device)  # ends by scoring itself (codec_scores) into codec.json
            seconds = time.time() - t0
            codec = load_codec(config, Path(work), device)
            check = json.loads((Path(work) / "codec" / "codec.json").read_text())["check"]
            row = {"recipe": name, "steps": args.steps, "train_seconds": round(seconds, 1),
                   "latent": list(codec.latent_shape(1, config.height, config.width)),
                   "parameters": sum(q.numel() for q in codec.vae.parameters()),
                   "character_weight": args.character_weight, "batch": args.batch, **check}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"{'recipe':>6} {'latent':>14} {'PSNR dB':>8} {'look_ok':>8} {'motion_ok':>9} {'adherence':>9} {'train s':>8}")
    for r in rows:
        print(f"{r['recipe']:>6} {str(r['latent']):>14} {r['psnr_db']:>8.2f} {r['look_ok']:>8.3f} {r['motion_ok']:>9.3f} "
              f"{r['adherence']:>9.3f} {r.get('train_seconds', 0):>8.1f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                                     "stories": args.stories, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
