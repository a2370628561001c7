"""Shot-by-shot generation: the context K/V cache against recomputing the context every step.

Both variants sample the same story shot by shot with the same seeds (causal MoC, so their
outputs agree to float rounding; tests/engine/test_engine.py checks that). With the cache, each
finished shot costs one extra "context pass" and every later step only pushes the live shot
through the transformer; without it, every step pushes the live shot *and all context shots*.
Work is counted, not guessed: query tokens through the transformer (projections + FFN scale
with it) and self-attention FLOPs (QK^T + PV over the attended keys), plus wall time.

Also: a both-sided regeneration with its context passes grouped (consecutive cached shots in one
forward) against one pass per shot (`--only grouped` runs that part alone); and more takes of a
shot with the other shots' context K/V kept from the take before (SamplerOptions.keep_context)
against reading them afresh for each take (`--only kept`).

Run:  python benchmarks/context_cache.py [--shots 4 --frames 6 --steps 10] [--only grouped|kept]   (CPU is fine)
Prints a table and writes benchmarks/results/context_cache.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.engine import context_noise_seed  # noqa: E402
from engine.model import StoryModel  # noqa: E402
from engine.sampler import Run, SamplerOptions, StorySampler  # noqa: E402
from engine.story import GenerationSettings, MoCSettings, Shot, Story  # noqa: E402


def make_story(shots: int, frames: int, steps: int) -> Story:
    settings = GenerationSettings(steps=steps, guidance=4.0, height=128, width=192, mode="shot_by_shot",
                                  moc=MoCSettings(top_k=5, backend="reference"))
    return Story("a fox and a bird in a snowy forest",
                 [Shot(f"shot {i}: the fox and the bird", frames, 100 + i) for i in range(shots)], settings).validate()


def run(model: StoryModel, story: Story, context_cache: bool) -> dict:
    sampler = StorySampler(model, story, options=SamplerOptions(context_cache=context_cache, preview=False))
    started = time.perf_counter()
    latents = {}
    for i, shot in enumerate(story.shots):
        out, _, _ = sampler.sample(Run((i,), (shot.seed,)), i)
        latents.update(out)
        if i + 1 < len(story.shots):
            sampler.encode_context(i, latents[i], context_noise_seed(shot.seed))
    seconds = time.perf_counter() - started
    return {"context_cache": context_cache, "seconds": seconds, "forwards": sampler.forwards,
            "query_tokens": sampler.forward_tokens, "attn_flops_moc": sampler.attn_flops_moc,
            "attn_flops_dense": sampler.attn_flops_dense, "latents": latents}


def regenerate_vs_full(shots: int, frames: int, steps: int) -> dict:
    """Through the engine: regenerating the last shot (earlier shots cached, context passes
    once per shot) against rendering every shot jointly."""
    import tempfile

    from engine.engine import StoryEngine
    story = make_story(shots, frames, steps).with_settings(mode="joint")
    story.shots[-1].seed = -1  # every regeneration draws a new take (a fixed seed would be a cache hit)
    with tempfile.TemporaryDirectory() as tmp:
        engine = StoryEngine.load(None, device="cpu", cache_dir=tmp)
        engine.render(make_story(2, 2, 1))  # warm-up
        full, regen = [], []
        for _ in range(2):
            engine.cache.clear()
            full.append(_timed(lambda: engine.render(story)))
            regen.append(_timed(lambda: engine.render(story, regenerate=shots - 1)))
        full, regen = min(full), min(regen)
    print(f"regenerate the last of {shots} shots (cached context): {regen:.2f} s vs all shots jointly "
          f"{full:.2f} s -> {full / regen:.2f}x")
    return {"full_joint_seconds": full, "regenerate_last_seconds": regen, "ratio": full / regen}


def grouped_context_passes(shots: int, frames: int, steps: int, repeats: int = 3) -> dict:
    """Through the engine: regenerating a middle shot with both sides as cached context, its
    context passes grouped (consecutive cached shots in one forward, StorySampler.context_groups;
    with no memory limit on the CPU: the earlier shots in one pass, the later ones in another)
    against one pass per shot (SamplerOptions(context_pass_tokens=1)). Same seeds both ways, so
    the new takes must agree to float rounding. Interleaved repeats, best of each."""
    import tempfile

    from engine.engine import StoryEngine
    from engine.events import Progress
    story = make_story(shots, frames, steps).with_settings(mode="joint")
    middle = shots // 2
    best, passes, takes = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        engines = {tokens: StoryEngine.load(None, device="cpu", cache_dir=Path(tmp) / f"tokens{tokens}",
                                            options=SamplerOptions(preview=False, context_pass_tokens=tokens,
                                                                   keep_context=False))
                   for tokens in (0, 1)}
        for engine in engines.values():
            engine.render(story)  # the cached takes both regenerations read
        for rep in range(repeats):
            for tokens, engine in engines.items():
                story.shots[middle].seed = 500 + rep
                events, made = [], []

                def go(engine=engine, events=events, made=made):
                    made.append(engine.render(story, regenerate=middle, on_event=events.append))
                seconds = _timed(go)
                best[tokens] = min(best.get(tokens, seconds), seconds)
                passes[tokens] = [list(e.context_shots) for e in events
                                  if isinstance(e, Progress) and e.context is not None]
                takes[tokens] = engine.cache.get(made[0].shots[middle].key).latents
    diff = float((takes[0] - takes[1]).abs().max())
    grouped, single = best[0], best[1]
    print(f"regenerate shot {middle + 1} of {shots}, both sides: context passes {passes[0]} {grouped:.2f} s, "
          f"one per shot {passes[1]} {single:.2f} s -> {single / grouped:.2f}x; max |latent difference| {diff:.2e}")
    return {"regenerated_shot": middle, "max_abs_latent_difference": diff, "grouped_seconds": grouped,
            "one_pass_per_shot_seconds": single, "ratio": single / grouped, "grouped_passes": passes[0],
            "one_pass_per_shot_passes": passes[1], "repeats": repeats}


def kept_context(shots: int, frames: int, steps: int, repeats: int = 3) -> dict:
    """Through the engine: more takes of a middle shot (both sides as context, a new seed each),
    the other shots' context K/V kept from the take before (SamplerOptions.keep_context, the
    default: no context pass runs) against reading them afresh for every take. Both engines made
    the same first take, so every later take must be the same bit for bit. Interleaved, best of each."""
    import tempfile

    from engine.engine import StoryEngine
    story = make_story(shots, frames, steps).with_settings(mode="joint")
    middle = shots // 2
    first_seed = story.shots[middle].seed
    best, passes, takes = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        engines = {keep: StoryEngine.load(None, device="cpu", cache_dir=Path(tmp) / f"keep{keep}",
                                          options=SamplerOptions(preview=False, keep_context=keep))
                   for keep in (True, False)}
        for engine in engines.values():
            story.shots[middle].seed = first_seed
            engine.render(story)  # the cached takes the regenerations read (the same in both)
            story.shots[middle].seed = 499
            engine.render(story, regenerate=middle)  # the first take: reads every other shot
        for rep in range(repeats):
            for keep, engine in engines.items():
                story.shots[middle].seed = 500 + rep
                made = []
                seconds = _timed(lambda engine=engine, made=made: made.append(
                    engine.render(story, regenerate=middle)))
                best[keep] = min(best.get(keep, seconds), seconds)
                passes[keep] = made[0].summary["context_passes"]
                takes[keep] = engine.cache.get(made[0].shots[middle].key).latents
    diff = float((takes[True] - takes[False]).abs().max())
    kept, fresh = best[True], best[False]
    print(f"another take of shot {middle + 1} of {shots}, both sides: context kept {passes[True]} {kept:.2f} s, "
          f"read afresh {passes[False]} {fresh:.2f} s -> {fresh / kept:.2f}x; max |latent difference| {diff:.2e}")
    return {"regenerated_shot": middle, "max_abs_latent_difference": diff, "kept_seconds": kept,
            "afresh_seconds": fresh, "ratio": fresh / kept, "kept_passes": passes[True],
            "afresh_passes": passes[False], "repeats": repeats}


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main(argv: list[str]) -> None:
    opts = dict(zip(argv[::2], argv[1::2]))
    shots, frames, steps = int(opts.get("--shots", 4)), int(opts.get("--frames", 6)), int(opts.get("--steps", 10))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = ROOT / "benchmarks" / "results" / "context_cache.json"
    parts = {"grouped": ("grouped_context_passes", grouped_context_passes), "kept": ("kept_context", kept_context)}
    if opts.get("--only") in parts:  # this part alone, merged into the JSON
        result = json.loads(out.read_text()) if out.exists() else {}
        name, part = parts[opts["--only"]]
        result[name] = part(shots, frames, steps)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out.relative_to(ROOT)}")
        return
    model = StoryModel.load(None, device="cpu")
    story = make_story(shots, frames, steps)
    run(model, make_story(2, 2, 1), True)  # warm-up (allocator, first-call overheads)
    trials = [run(model, story, cache) for _ in range(2) for cache in (True, False)]  # interleaved: fair under load
    cached = min((t for t in trials if t["context_cache"]), key=lambda t: t["seconds"])
    recompute = min((t for t in trials if not t["context_cache"]), key=lambda t: t["seconds"])
    diff = max(float((cached["latents"][i] - recompute["latents"][i]).abs().max()) for i in range(shots))
    rows = [("query tokens through the transformer", "query_tokens"), ("self-attention FLOPs (MoC)", "attn_flops_moc"),
            ("self-attention FLOPs if dense", "attn_flops_dense"), ("transformer forwards", "forwards"),
            ("wall time [s] (best of 2)", "seconds")]
    print(f"shot-by-shot, {shots} shots x {frames} latent frames, {steps} steps, guidance on, "
          f"{model.transformer.frame_tokens(16, 24)} tokens/frame, default model on {model.device}")
    print(f"{'':40s} {'recompute':>14s} {'K/V cache':>14s} {'ratio':>8s}")
    result = {"config": {"shots": shots, "frames": frames, "steps": steps, "model": model.name,
                         "device": str(model.device), "threads": torch.get_num_threads()},
              "max_abs_latent_difference": diff}
    for label, key in rows:
        a, b = recompute[key], cached[key]
        ratio = a / b if b else float("nan")
        result[key] = {"recompute": a, "kv_cache": b, "ratio": ratio}
        print(f"{label:40s} {a:14.4g} {b:14.4g} {ratio:7.2f}x")
    print(f"max |latent difference| between the two: {diff:.2e}")
    result["regenerate_last_shot"] = regenerate_vs_full(shots, frames, steps)
    result["grouped_context_passes"] = grouped_context_passes(shots, frames, steps)
    result["kept_context"] = kept_context(shots, frames, steps)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main(sys.argv[1:])
