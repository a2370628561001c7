"""Render stories with a model and write one picture per story: a row per shot, its caption on the
left and every other frame to the right (the README's pictures of what the default model does).

  python scripts/story_strips.py examples/default_story.json examples/night_with_stripes.json \
      --out docs/stories [--model PATH] [--frames-shown 4]

Writes OUT/<story name>.jpg and OUT/strips.json (per story: model, seconds, settings). Renders go
through the engine exactly as the app renders (a scratch shot cache, deleted afterwards).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LABEL_WIDTH = 260  # pixels of caption text left of each shot's frames
GAP = 4  # pixels between frames


def strip_image(frames_per_shot, captions, global_caption: str, frames_shown: int = 4):
    """(H', W', 3) uint8 RGB: a title line, then per shot its caption and `frames_shown` evenly
    spaced frames. frames_per_shot: per shot a (T, H, W, 3) uint8 array."""
    import cv2
    import numpy as np
    H, W = frames_per_shot[0].shape[1:3]
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.42
    width = LABEL_WIDTH + frames_shown * (W + GAP)
    rows = [_text_panel([global_caption], width, 26, font, 0.5, bold=True)]
    for i, (frames, caption) in enumerate(zip(frames_per_shot, captions)):
        pick = np.linspace(0, frames.shape[0] - 1, frames_shown).round().astype(int)
        row = np.full((H, width, 3), 255, np.uint8)
        lines = [f"shot {i + 1}"] + textwrap.wrap(caption, 36)
        row[:, :LABEL_WIDTH] = _text_panel(lines, LABEL_WIDTH, H, font, scale)
        for j, t in enumerate(pick):
            x = LABEL_WIDTH + j * (W + GAP)
            row[:, x:x + W] = frames[t]
        rows += [row, np.full((GAP, width, 3), 255, np.uint8)]
    return np.concatenate(rows, 0)


def _text_panel(lines, width: int, height: int, font, scale: float, bold: bool = False):
    import cv2
    import numpy as np
    panel = np.full((height, width, 3), 255, np.uint8)
    for k, line in enumerate(lines):
        cv2.putText(panel, line, (6, 18 + 17 * k), font, scale, (30, 30, 30), 2 if bold else 1, cv2.LINE_AA)
    return panel


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stories", nargs="+", type=Path, help="story JSON files")
    p.add_argument("--out", type=Path, required=True, help="folder for the pictures and strips.json")
    p.add_argument("--model", type=Path, default=None, help="model folder (default: the shipped default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--frames-shown", type=int, default=4, help="frames per shot in the picture")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import cv2

    from engine.engine import StoryEngine
    from engine.story import Story
    stories = [(path, Story.load(path)) for path in args.stories]  # bad input fails before any render
    args.out.mkdir(parents=True, exist_ok=True)
    record = {}
    with tempfile.TemporaryDirectory() as scratch:
        engine = StoryEngine.load(model=args.model, device=args.device, cache_dir=Path(scratch) / "cache")
        for path, story in stories:
            started = time.perf_counter()
            result = engine.render(story)
            seconds = time.perf_counter() - started
            frames = [engine.cache.get(shot.key).frames.numpy() for shot in result.shots]
            img = strip_image(frames, [s.caption for s in story.shots], story.global_caption, args.frames_shown)
            target = args.out / f"{path.stem}.jpg"
            cv2.imwrite(str(target), img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
            record[path.stem] = {"story": str(path), "picture": target.name, "seconds": round(seconds, 1),
                                 "model": engine.model.name, "trained": engine.model.trained,
                                 "device": str(engine.model.device), "steps": story.settings.steps,
                                 "guidance": story.settings.guidance, "mode": story.settings.mode}
            print(f"{target}: {len(story.shots)} shots in {seconds:.1f} s", flush=True)
    (args.out / "strips.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
