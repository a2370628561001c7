"""Does weighting the flow loss toward the characters' cells make samples paint too much character?

Fine-tunes one trained transformer twice on the CPU, on the same stories and seeds, once with the
character-weighted loss (`character_weight` 6, runs 1 and 2) and once unweighted (0, now the
default), then measures, on held-out 3-shot stories (joint, 12 steps, guidance 4), the share of
pixels far (RGB distance > 60) from the world's background colours, against the drawn ground
truth. A ratio near 1 means characters of the right size; the weighted loss predicts a larger one.

  python benchmarks/loss_weight_ablation.py --init MODEL --codec WORK/codec --steps 80 --stories 4 \
      --work /tmp/ablation --json benchmarks/results/loss_weight_ablation.json

MODEL: a trained storyboard model folder (run 2's export); WORK/codec: its trainer codec folder
(`codec.json` + `vae.safetensors`, e.g. from `engine.trainer.import_codec`). Dense attention and
one 4-shot story a step keep it to about 9 s a step on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def character_area(model_folder: Path, stories: int) -> dict:
    from engine.model import StoryModel
    from engine.sampler import Run, StorySampler
    from engine.shapestory.render import story_frames
    from engine.shapestory.score import _background_distance
    from engine.shapestory.world import HELDOUT_SEED_START, sample_story, to_story
    model = StoryModel.load(model_folder, device="cpu")
    generated, drawn = [], []
    for i in range(stories):
        spec = sample_story(HELDOUT_SEED_START + 700_000 + i, num_shots=3, frames=8, names="heldout")
        story = to_story(spec, steps=12, guidance=4.0, height=128, width=192)
        with torch.no_grad():
            latents, _, _ = StorySampler(model, story).sample(Run(tuple(range(3)), tuple(s.seed for s in story.shots)))
        truth = story_frames(spec, 128, 192).numpy()
        for s in range(3):
            frames = model.codec.decode(latents[s]).numpy().astype(np.float32)
            generated.append(float((_background_distance(frames, spec.world, spec.pattern) > 60).mean()))
            drawn.append(float((_background_distance(truth[s].astype(np.float32), spec.world, spec.pattern) > 60).mean()))
    return {"generated": round(float(np.mean(generated)), 4), "drawn": round(float(np.mean(drawn)), 4),
            "ratio": round(float(np.mean(generated) / np.mean(drawn)), 2), "shots": len(generated)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--init", type=Path, required=True, help="trained storyboard model folder to fine-tune")
    p.add_argument("--codec", type=Path, required=True, help="trainer codec folder (codec.json, vae.safetensors)")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--stories", type=int, default=4, help="held-out 3-shot stories measured per model")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    from engine.trainer import TrainerConfig, export_model, train_transformer
    base = TrainerConfig(tokens_per_step=3072, lr=1e-4, warmup=10, minutes=1e4, max_steps=args.steps, moc=False,
                         log_every=10, checkpoint_minutes=1e9, sample_minutes=1e9, frames_choices=(8,),
                         shot_weights=(0, 0, 0, 1, 0, 0, 0, 0))
    models = {"start": args.init}
    for name, weight in (("weighted", 6.0), ("unweighted", 0.0)):
        work = args.work / name
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        shutil.copytree(args.codec, work / "codec")
        config = replace(base, character_weight=weight)
        train_transformer(config, work, torch.device("cpu"), init_from=args.init)
        models[name] = export_model(config, work, work / "model")
    result = {"steps": args.steps, "stories": args.stories, "models": {}}
    print(f"{'model':12} {'generated':>9} {'drawn':>7} {'ratio':>6}")
    for name, folder in models.items():
        row = character_area(folder, args.stories)
        result["models"][name] = row
        print(f"{name:12} {row['generated']:9.4f} {row['drawn']:7.4f} {row['ratio']:6.2f}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
