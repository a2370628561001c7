"""How much the text encoder's token states change when a caption's colour, size or shape word does.

    python benchmarks/text_contrast.py [--json benchmarks/results/text_contrast.json]

A check of one explanation of the trained model's shape floor (docs/training): that MiniLM's states
for "triangle" and "circle" in a caption are too alike for the cross-attention to tell apart. For
caption templates from ShapeStory's wording, every pair of colours (shapes, sizes) is swapped in
an otherwise equal caption, and the change is the relative L2 distance of the token states
(|a - b| / |a|), averaged over tokens and over the pairs. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEMPLATES = ("Kip, a {size} {colour} {shape}, bounces.", "Wide shot: a {size} {colour} {shape} called Momo slides to the right.",
             "Close-up: Tivo the {size} {colour} {shape} goes up.")


def contrast(encoder, templates=TEMPLATES) -> dict:
    """Mean relative change of the token states per kind of word swapped: {kind: {mean, max_token}}."""
    from engine.shapestory.world import COLOURS, SHAPES, SIZES
    base = {"colour": "red", "shape": "circle", "size": "small"}
    words = {"colour": list(COLOURS), "shape": list(SHAPES), "size": list(SIZES)}
    out = {}
    for kind, options in words.items():
        means, peaks = [], []
        for template in templates:
            for a, b in itertools.combinations(options, 2):
                sa, sb = encoder.encode([template.format(**{**base, kind: a}), template.format(**{**base, kind: b})])
                if sa.shape != sb.shape:  # a word of several word pieces: not comparable token by token
                    continue
                rel = (sa.float() - sb.float()).norm(dim=-1) / sa.float().norm(dim=-1)
                means.append(float(rel.mean()))
                peaks.append(float(rel.max()))
        out[kind] = {"pairs": len(means), "mean": round(statistics.mean(means), 4), "max_token": round(statistics.mean(peaks), 4)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "text_contrast.json")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from engine.text import MiniLMEncoder
    result = {"benchmark": "text_contrast", "encoder": "all-MiniLM-L6-v2", "templates": list(TEMPLATES),
              "contrast": contrast(MiniLMEncoder.load("cpu"))}
    print(f"{'word swapped':<14}{'pairs':>6}{'mean change':>13}{'largest token':>15}")
    for kind, r in result["contrast"].items():
        print(f"{kind:<14}{r['pairs']:>6}{r['mean']:>13.3f}{r['max_token']:>15.3f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
