"""Can the recipe learn one story? A check of the whole training-to-rendering path.

Fine-tunes a model's transformer on a few fixed stories only (fresh noise and noise levels every
step, the trainer's loss and MoC routing) and, every `--every` steps, renders them the way the app
does (joint, 12 steps, guidance 4) and scores the renders with the ShapeStory scorer. A model that
can memorise a story must end up drawing it: the look ladder (colour on screen, at the right size,
with the right shape) climbs to the top and adherence reaches 1. If it does, the codec, the patch
grid, the noise-level conventions, the caption routing and the sampler agree with each other, and
what a trained model lacks is training; if it does not, the rung where it stops names the part of
the path that cannot carry a look.

  python benchmarks/overfit.py --init MODEL --stories 1 --steps 300 --every 100 \\
      --json benchmarks/results/overfit_cpu.json --png docs/training/overfit.jpg

The stories are drawn from seeds no benchmark scores (HELDOUT_SEED_START + 800_000 + i). On the
2-core CPU a step of two copies of one 2-shot story of 6 latent frames (1,152 tokens) takes about
a second, a scored render about ten.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SEED_BASE = 800_000  # above HELDOUT_SEED_START: none of quality.py's, the trainer's or the ablation's stories


def fixed_stories(count: int, shots: int, frames: int) -> list:
    from engine.shapestory.world import HELDOUT_SEED_START, sample_story
    return [sample_story(HELDOUT_SEED_START + SEED_BASE + i, num_shots=shots, frames=frames, names="heldout")
            for i in range(count)]


def render_and_score(model, specs, height: int, width: int) -> tuple[dict, list[np.ndarray]]:
    """Joint renders of `specs` with `model` as the app samples them, scored as quality.py scores
    them (counts pooled over the stories); (summary, strips)."""
    from benchmarks.quality import look_ladder, render, score_frames
    from engine.shapestory.render import story_frames
    from engine.shapestory.world import to_story
    counts, strips = {}, []
    for spec in specs:
        with torch.no_grad():
            frames = render(model, to_story(spec, steps=12, guidance=4.0, height=height, width=width)).frames
        for key, n in score_frames(spec, frames)["counts"].items():
            counts[key] = counts.get(key, 0) + n
        truth = story_frames(spec, height, width).numpy()
        for s, gen in enumerate(frames):
            strips.append(np.concatenate([np.concatenate(list(truth[s, ::2]), 1), np.concatenate(list(gen[::2]), 1)], 1))
    summary = {"adherence": round(counts["adherent"] / max(counts["described"], 1), 3),
               "look_ladder": {rung: None if v is None else round(v, 3) for rung, v in look_ladder(counts).items()},
               "appearances": counts["appearances"]}
    return summary, strips


def overfit(init: Path, stories: int = 1, shots: int = 2, frames: int = 6, steps: int = 300, every: int = 100,
            lr: float = 2e-4, copies: int = 2, moc: bool = True, seed: int = 0, log=print) -> dict:
    from engine.model import StoryModel
    from engine.moc import MoCConfig
    from engine.shapestory.render import story_frames
    from engine.training import StoryBatch, TrainingConfig, training_loss
    from engine.default_model import HEIGHT, WIDTH
    model = StoryModel.load(init, device="cpu", dtype=torch.float32)
    height, width = HEIGHT, WIDTH
    specs = fixed_stories(stories, shots, frames)
    net = model.transformer.model.float().train().requires_grad_(True)
    latents = torch.stack([torch.cat([model.codec.encode(story_frames(s, height, width)[i]) for i in range(shots)], 1)
                           for s in specs])  # (stories, C, shots * frames, h, w)
    text = [list(model.text_encoder.encode([s.global_caption] + [sh.caption for sh in s.shots])) for s in specs]
    batch = StoryBatch(latents.repeat_interleave(copies, 0), (frames,) * shots,
                       [t for t in text for _ in range(copies)])
    tcfg = TrainingConfig(moc=MoCConfig() if moc else None, backend="reference")
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    start = [p.detach().clone() for p in net.parameters()]
    rows, strips, losses, t0 = [], {}, [], time.time()

    def evaluate(step: int) -> None:
        net.eval()
        summary, strip = render_and_score(model, specs, height, width)
        net.train()
        row = {"step": step, "loss": round(float(np.mean(losses[-every:])), 4) if losses else None, **summary,
               "seconds": round(time.time() - t0, 1)}
        rows.append(row)
        strips[step] = strip
        log(json.dumps(row))

    evaluate(0)
    for step in range(1, steps + 1):
        loss = training_loss(model.transformer, batch, tcfg, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % every == 0 or step == steps:
            evaluate(step)
    moved = sum(float((p.detach() - q).pow(2).sum()) for p, q in zip(net.parameters(), start))
    size = sum(float(q.pow(2).sum()) for q in start)
    return {"init": str(init), "weight_change": round((moved / size) ** 0.5, 5), "stories": stories, "shots": shots, "frames": frames, "steps": steps, "lr": lr,
            "copies": copies, "moc": moc, "seeds": [SEED_BASE + i for i in range(stories)], "rows": rows,
            "strips": strips}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--init", type=Path, required=True, help="storyboard model folder whose transformer is fine-tuned")
    p.add_argument("--stories", type=int, default=1)
    p.add_argument("--shots", type=int, default=2)
    p.add_argument("--frames", type=int, default=6, help="latent frames per shot")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=100, help="render and score every this many steps")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--dense", action="store_true", help="dense attention instead of MoC routing")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--png", type=Path, default=None, help="strips (drawn left, rendered right) at the first and last scoring")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    result = overfit(args.init, args.stories, args.shots, args.frames, args.steps, args.every, args.lr, moc=not args.dense)
    strips = result.pop("strips")
    print(f"{'step':>5} {'loss':>7} {'adherence':>9} {'colour':>7} {'+size':>6} {'+shape':>7} {'+motion':>8}")
    for r in result["rows"]:
        lad = r["look_ladder"]
        loss = "" if r["loss"] is None else f"{r['loss']:.4f}"
        print(f"{r['step']:>5} {loss:>7} {r['adherence']:>9.3f} {lad['colour']:>7.2f} {lad['colour_size']:>6.2f} "
              f"{lad['colour_size_shape']:>7.2f} {lad['look_and_motion']:>8.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.png:
        import cv2
        first, last = min(strips), max(strips)
        gap = np.full((8, strips[first][0].shape[1], 3), 255, np.uint8)
        image = np.concatenate([*strips[first], gap, *strips[last]], 0)
        args.png.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(args.png), image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    return 0


if __name__ == "__main__":
    sys.exit(main())
