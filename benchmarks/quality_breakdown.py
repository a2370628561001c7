"""Where the right looks are, from quality.py JSONs: by framing and size, by shape, where memory
fails, and paired.

    python benchmarks/quality_breakdown.py A.json [B.json] [--variant moc --mode joint]

For each file: the appearances with the right look (look_ok: colour, size and shape in at least
half the frames), split by the shot's framing and the character's size, and by the character's
shape. A soft blob is read as a circle, so the shape split shows whether a model draws outlines
at all. The memory split takes the appearances named without their look: by characters in the
shot, by shots since the introduction, by how well the shot's routing follows the story. With two
files scored on the same stories (same seeds and lengths): the appearances right
in only one of them, and McNemar's exact two-sided p for "neither is better" (docs/training, run 8).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def appearances(doc: dict, variant: str = "moc", mode: str = "joint") -> dict[tuple, tuple[str, str, str, bool]]:
    """{(seed, shot, index): (framing, size, shape, look_ok)} of one quality.py document."""
    from engine.shapestory.world import sample_story
    frames = doc["config"]["frames"]
    out = {}
    for story in doc["stories"]:
        spec = sample_story(story["seed"], num_shots=story["num_shots"], frames=frames, names=story["names"])
        run = next(r for r in story["runs"] if r["variant"] == variant and r["mode"] == mode)
        for s, (shot, scored) in enumerate(zip(spec.shots, run["shots"])):
            for i, (app, got) in enumerate(zip(shot.appearances, scored["appearances"])):
                c = spec.characters[app.character]
                out[(story["seed"], s, i)] = (shot.framing, c.size, c.shape, bool(got["look_ok"]))
    return out


def breakdown(apps: dict) -> dict:
    """{"framing_size": {"close big": [right, of], ...}, "shape": {...}}."""
    out = {"framing_size": {}, "shape": {}}
    for framing, size, shape, ok in apps.values():
        for table, key in (("framing_size", f"{framing} {size}"), ("shape", shape)):
            row = out[table].setdefault(key, [0, 0])
            row[0] += ok
            row[1] += 1
    return out


ROUTING_BANDS = ((0.0, 1.0, "below chance"), (1.0, 2.0, "1-2x chance"), (2.0, math.inf, "2x chance or more"))


def memory_breakdown(doc: dict, variant: str = "moc", mode: str = "joint") -> dict:
    """Where identity is lost: the look-less appearances (a character named without its look) with
    the right look, as [right, of], by how many characters the shot shows, by how many shots back
    the character was introduced, and (variant moc) by how far the shot's routing goes to the
    shots that show its characters (the routing entry's share over chance, quality.py's
    routing_follows_story; shots without one are left out of that table)."""
    from engine.shapestory.world import sample_story
    frames = doc["config"]["frames"]
    out = {"characters_in_shot": {}, "shots_since_introduction": {}, "routing": {}}

    def count(table: str, key: str, ok: bool) -> None:
        row = out[table].setdefault(key, [0, 0])
        row[0] += ok
        row[1] += 1

    for story in doc["stories"]:
        spec = sample_story(story["seed"], num_shots=story["num_shots"], frames=frames, names=story["names"])
        run = next(r for r in story["runs"] if r["variant"] == variant and r["mode"] == mode)
        routing = {x["shot"]: x["share_over_chance"] for x in run.get("routing") or []}
        for s, (shot, scored) in enumerate(zip(spec.shots, run["shots"])):
            for app, got in zip(shot.appearances, scored["appearances"]):
                if app.described:
                    continue
                ok = bool(got["look_ok"])
                count("characters_in_shot", str(len(shot.appearances)), ok)
                back = s - spec.first_shot(app.character)
                count("shots_since_introduction", "global caption only" if back == 0 else
                      str(back) if back < 4 else "4 or more", ok)
                ratio = routing.get(s)
                if ratio is not None:
                    count("routing", next(name for lo, hi, name in ROUTING_BANDS if lo <= ratio < hi), ok)
    return out


def mcnemar(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p (binomial test of the discordant pairs at 1/2)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, j) for j in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired(a: dict, b: dict) -> dict:
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError("the two files share no appearance: score the same stories (seeds) with both models")
    only = Counter((a[k][3], b[k][3]) for k in common)
    return {"appearances": len(common), "both": only[(True, True)], "only_first": only[(True, False)],
            "only_second": only[(False, True)], "p_mcnemar": float(f"{mcnemar(only[(True, False)], only[(False, True)]):.3g}")}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", type=Path, nargs="+", help="one or two quality.py JSONs")
    p.add_argument("--variant", default="moc")
    p.add_argument("--mode", default="joint")
    args = p.parse_args(argv)
    if len(args.json) > 2:
        p.error("give one or two quality.py JSONs")
    docs = [json.loads(f.read_text()) for f in args.json]
    apps = [appearances(doc, args.variant, args.mode) for doc in docs]
    result = {"files": [str(f) for f in args.json], "breakdown": [breakdown(a) for a in apps],
              "memory": [memory_breakdown(doc, args.variant, args.mode) for doc in docs]}
    for f, b, m in zip(args.json, result["breakdown"], result["memory"]):
        print(f"{f} ({args.variant}, {args.mode}): right look / appearances")
        for table in ("framing_size", "shape"):
            print("  " + ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in sorted(b[table].items())))
        print("  named without their look, by characters in the shot: "
              + ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in sorted(m["characters_in_shot"].items())))
        print("  by shots since the introduction: "
              + ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in sorted(m["shots_since_introduction"].items())))
        if m["routing"]:
            print("  by the shot's routing to its characters' shots: "
                  + ", ".join(f"{name} {m['routing'][name][0]}/{m['routing'][name][1]}"
                              for _, _, name in ROUTING_BANDS if name in m["routing"]))
    if len(apps) == 2:
        result["paired"] = paired(*apps)
        q = result["paired"]
        print(f"paired on {q['appearances']} appearances: right in both {q['both']}, only in the first "
              f"{q['only_first']}, only in the second {q['only_second']}, McNemar p {q['p_mcnemar']:.3g}")
    return result


if __name__ == "__main__":
    main()
