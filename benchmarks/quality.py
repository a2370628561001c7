"""Quality benchmark of a story model: held-out ShapeStory stories, rendered and scored.

For: measuring what the default model is for. Held-out stories (seeds from HELDOUT_SEED_START up,
half with names no training story used) are rendered with the real sampling code (StorySampler,
codec.decode) three ways on one checkpoint, each in joint and shot-by-shot mode:
  moc       the default MoC settings; on CUDA the backend is forced to "triton" (the float32
            "reference" for head dims the kernel does not take), since "auto" runs dense SDPA at
            these short lengths on a GPU; on the CPU "auto" (exact MoC: the chunked path, or
            masked SDPA when small)
  dense     settings.moc.enabled = False
  isolated  every shot alone, as a one-shot story with the global caption, its caption and its
            seed: no memory at all (joint and shot-by-shot are the same computation here: it runs
            once and is reported under both modes)
The decoded frames are scored against the generator's ground truth (engine/shapestory/score.py):
caption adherence, identity (a character named without its look matches the look it was
introduced with), background consistency, temporal smoothness. From the MoC runs' routing
statistics: sparsity per story length, and whether routing follows the story (`routing_follows_story`).
A codec check scores ground-truth clips after encode -> decode. Prints a table, writes JSON with a
summary, the issue's targets (pass / fail) and one row per story.
Not for: speed of attention (attention.py), videos or the app (nothing is written but the JSON).

Run:  python benchmarks/quality.py [--stories 100] [--device auto] [--json benchmarks/results/quality.json]

Routing follows the story. For a shot s that names an earlier-introduced character c without its
look, take the routed selections of s's query tokens (routing's top-k picks only, never the forced
own-shot links; every head, batch entry and layer, at the recorded steps) that land in earlier
shots. share = the part of them that lands in shots showing c; chance = the part of the routable
earlier chunks (all chunks of shots 0..s-1) that belong to shots showing c, i.e. the share a
router picking uniformly at random would get. A pair where routing has no choice (c is in every
earlier shot, or there are no more routable chunks than top_k) is left out: its share equals its
chance whatever the router does. Per shot the pairs are averaged, then share, chance and
share / chance are averaged over shots.

Summary: adherence and identity are pooled over appearances of all stories, background and
smoothness averaged over stories, each per (variant, mode) and then averaged over the modes.
Sparsity is 1 - attention density (keys attended / keys present, as the routing recorder counts
it); its target is read in joint mode, where the whole story is one sequence as in the paper.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.engine import context_noise_seed  # noqa: E402
from engine.model import StoryModel  # noqa: E402
from engine.moc.attention import TRITON_HEAD_DIMS  # noqa: E402
from engine.routing_report import RoutingRecorder  # noqa: E402
from engine.sampler import Run, SamplerOptions, StorySampler  # noqa: E402
from engine.shapestory.render import story_frames  # noqa: E402
from engine.shapestory.score import score_shot, score_story  # noqa: E402
from engine.shapestory.world import HELDOUT_SEED_START, StorySpec, sample_story, to_story  # noqa: E402
from engine.story import MODES, GenerationSettings, MoCSettings, Shot, Story  # noqa: E402

VARIANTS = ("moc", "dense", "isolated")
LENGTH_CYCLE = (8, 2, 3, 8, 4, 5, 8, 6, 7, 8, 1)  # shots per story, in turn: 8-shot stories are 4 in 11
METRICS = ("adherence", "identity", "identity_no_global", "background", "smoothness")
ADHERENCE_TARGET = 0.90  # MoC: described appearances with the right look and motion
IDENTITY_TARGET = 0.90  # MoC: characters named without their look keep it
DENSE_MARGIN = 0.02  # MoC may trail dense by at most this on any metric, in any mode
MEMORY_GAIN = 0.30  # identity(moc) - identity(isolated): what the memory adds
ROUTING_TARGET = 2.0  # routing share over chance
SPARSITY_TARGET = 0.75  # 1 - attention density on 8-shot stories (joint mode: one sequence, as in the paper)


@dataclass(frozen=True)
class BenchConfig:
    stories: int = 100  # held-out stories
    steps: int | None = None  # denoising steps (None: the story default)
    guidance: float | None = None  # classifier-free guidance (None: the story default)
    top_k: int | None = None  # MoC's routed chunks per query (None: the story default)
    context_noise: float | None = None  # shot by shot: the context shots' noise level (None: the story default)
    modes: tuple[str, ...] = MODES  # "joint", "shot_by_shot"
    variants: tuple[str, ...] = VARIANTS  # "moc", "dense", "isolated"
    height: int = 128  # frame size
    width: int = 192
    frames: int = 8  # latent frames per shot
    seed_offset: int = 0  # first seed is HELDOUT_SEED_START + seed_offset
    memory: bool = False  # also the regeneration experiments (memory_experiment) on stories of 3+ shots
    open_top_k: int = 0  # > 0: the memory experiments also regenerate both-sided with this many later
    #                      chunks routed in a top-k of their own (SamplerOptions.open_top_k)
    shard: tuple[int, int] = (0, 1)  # (i, n): run stories i, i + n, i + 2n, ... (parallel processes; --merge)
    time_limit: float = 0.0  # seconds; start no story after this (0: none); the stories done are reported


@dataclass
class Rendered:
    frames: list[np.ndarray]  # per shot (F, H, W, 3) uint8
    shot_routing: list[tuple[int, float]]  # per shot (frames, mean attention density)
    routed: np.ndarray | None  # (S, S) routed selections: query shot x key shot (None: isolated shots)
    shot_chunks: list[int]  # video chunks per shot
    backends: dict  # attention calls per backend that ran
    seconds: float  # sampling + context passes + decoding


# ---- the stories ---------------------------------------------------------------------------------

def benchmark_specs(config: BenchConfig) -> list[tuple[StorySpec, str]]:
    """(spec, names) of every benchmark story: lengths cycle through LENGTH_CYCLE, names alternate
    between the training pool and the held-out pool (the cycle's odd length mixes the two)."""
    out = []
    for i in range(config.stories):
        names = "heldout" if i % 2 else "train"
        seed = HELDOUT_SEED_START + config.seed_offset + i
        spec = sample_story(seed, num_shots=LENGTH_CYCLE[i % len(LENGTH_CYCLE)], frames=config.frames, names=names)
        out.append((spec, names))
    return out


def moc_backend(model: StoryModel) -> tuple[str, str]:
    """The attention backend of the MoC runs, and why. On a GPU "auto" would run dense SDPA at
    these short lengths, so MoC is forced: the Triton kernel where it takes the head dim, else the
    float32 reference (the same routing and attention, slower)."""
    if model.device.type != "cuda":
        return "auto", "CPU: auto runs exact MoC (the chunked path at story sizes, masked SDPA below)"
    if model.transformer.head_dim in TRITON_HEAD_DIMS:
        return "triton", "CUDA: the fused Triton kernel, forced (auto would choose dense SDPA at these lengths)"
    return "reference", (f"CUDA: head dim {model.transformer.head_dim} is not one the Triton kernel takes "
                         f"{TRITON_HEAD_DIMS}, so the float32 reference runs MoC")


def story_settings(variant: str, mode: str, backend: str, config: BenchConfig) -> dict:
    """GenerationSettings fields of one variant (to_story's keyword arguments); backend: moc_backend's."""
    moc = MoCSettings(enabled=False) if variant == "dense" else MoCSettings(backend=backend)
    if config.top_k is not None:
        moc.top_k = config.top_k
    settings = dict(height=config.height, width=config.width, mode=mode, moc=moc)
    if config.context_noise is not None:
        settings["context_noise"] = config.context_noise
    if config.steps is not None:
        settings["steps"] = config.steps
    if config.guidance is not None:
        settings["guidance"] = config.guidance
    return settings


# ---- rendering -----------------------------------------------------------------------------------

def routed_by_shot(recorders: list[RoutingRecorder], num_shots: int) -> np.ndarray:
    """(S, S) routed selections (not forced links) of each query shot's tokens per key shot, summed
    over heads, batch, layers and the recorded steps. Joint: one recorder with every shot live;
    shot by shot: one recorder per shot, its layout ending at that shot."""
    routed = np.zeros((num_shots, num_shots))
    for recorder in recorders:
        for s, counts in recorder.recall.items():
            routed[s, :len(counts)] += counts
    return routed


def _shot_chunks(recorder: RoutingRecorder) -> list[int]:
    """Video chunks of every shot of the recorder's layout."""
    shots = recorder.chunk_shot[recorder.chunk_shot >= 0]
    return torch.bincount(shots, minlength=recorder.layout.num_shots).tolist()


def _merged(counters: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for counter in counters:
        for name, calls in counter.items():
            out[name] = out.get(name, 0) + calls
    return out


def _rendered(model: StoryModel, latents: dict[int, torch.Tensor], recorders: list[RoutingRecorder],
              started: float) -> Rendered:
    """Decode every shot and collect the runs' routing statistics."""
    S = len(latents)
    frames = [model.codec.decode(latents[s]).numpy() for s in range(S)]
    routing = [(rec.layout.shot_frames[s], rec.shot_routing(s).mean_density)
               for rec in recorders for s in rec.live_shots]
    longest = max(recorders, key=lambda r: r.layout.num_shots)
    return Rendered(frames, routing, routed_by_shot(recorders, S), _shot_chunks(longest),
                    _merged([rec.backends for rec in recorders]), time.perf_counter() - started)


@torch.no_grad()
def render(model: StoryModel, story: Story) -> Rendered:
    """Every shot of `story` in its settings' mode, as the engine samples a fresh render: joint is
    one run of all shots; shot by shot samples shot i with shots < i as re-noised context."""
    started = time.perf_counter()
    sampler = StorySampler(model, story, options=SamplerOptions(preview=False))
    seeds = [shot.seed for shot in story.shots]
    S = len(seeds)
    if story.settings.mode == "joint":
        latents, recorder, _ = sampler.sample(Run(tuple(range(S)), tuple(seeds)))
        return _rendered(model, latents, [recorder], started)
    latents, recorders = sample_shot_by_shot(sampler, seeds)
    return _rendered(model, latents, recorders, started)


def sample_shot_by_shot(sampler: StorySampler, seeds: list[int]) -> tuple[dict[int, torch.Tensor], list]:
    """Shot i sampled with shots < i as re-noised context: ({shot: clean latents}, recorders)."""
    latents, recorders = {}, []
    for s in range(len(seeds)):
        out, recorder, _ = sampler.sample(Run((s,), (seeds[s],)), s)
        latents.update(out)
        recorders.append(recorder)
        if s + 1 < len(seeds):
            sampler.encode_context(s, latents[s], context_noise_seed(seeds[s]))
    return latents, recorders


def render_isolated(model: StoryModel, story: Story) -> Rendered:
    """Every shot alone: a one-shot story with the global caption, the shot's caption and seed."""
    started = time.perf_counter()
    parts = [render(model, Story(story.global_caption, [Shot(shot.caption, shot.frames, shot.seed)], story.settings))
             for shot in story.shots]
    return Rendered(frames=[p.frames[0] for p in parts], shot_routing=[p.shot_routing[0] for p in parts],
                    routed=None, shot_chunks=[p.shot_chunks[0] for p in parts],
                    backends=_merged([p.backends for p in parts]), seconds=time.perf_counter() - started)


def sparsity(rendered: Rendered) -> float:
    """1 - attention density, frame-weighted over the shots (each shot's density as recorded)."""
    frames = sum(f for f, _ in rendered.shot_routing)
    return 1.0 - sum(f * d for f, d in rendered.shot_routing) / frames


# ---- scoring -------------------------------------------------------------------------------------

def routing_follows_story(spec: StorySpec, routed: np.ndarray, shot_chunks: list[int], top_k: int) -> list[dict]:
    """Per shot that names an earlier-introduced character without its look: the share of its
    routed selections into earlier shots that land in shots showing that character, against the
    share of routable earlier chunks those shots hold (chance). routed (S, S): query shot x key
    shot; shot_chunks: video chunks per shot. Pairs where routing has no choice are left out;
    a shot with none left (or no routed selection at all) is reported with share None."""
    out = []
    for s, shot in enumerate(spec.shots):
        named = [a.character for a in shot.appearances if not a.described]
        routable = sum(shot_chunks[:s])
        if not named or routable == 0:
            continue
        into_earlier = routed[s, :s]
        total = float(into_earlier.sum())
        pairs = []
        for c in named:
            showing = [j for j in range(s) if any(a.character == c for a in spec.shots[j].appearances)]
            chance = sum(shot_chunks[j] for j in showing) / routable
            if showing and chance < 1 and routable > top_k and total > 0:
                pairs.append((float(into_earlier[showing].sum()) / total, chance))
        entry = {"shot": s, "characters": [spec.characters[c].name for c in named], "routed": total,
                 "share": None, "chance": None, "share_over_chance": None}
        if pairs:
            entry.update(share=float(np.mean([p for p, _ in pairs])), chance=float(np.mean([c for _, c in pairs])),
                         share_over_chance=float(np.mean([p / c for p, c in pairs])))
        out.append(entry)
    return out


def _named_in_global(spec: StorySpec) -> set[int]:
    """Characters the global caption names (and so describes), as score_story decides it."""
    return {i for i, c in enumerate(spec.characters) if re.search(rf"\b{re.escape(c.name)}\b", spec.global_caption)}


def score_frames(spec: StorySpec, frames: list[np.ndarray]) -> dict:
    """The story's scores, the appearance counts behind them (for pooling over stories) and per shot."""
    score = score_story(spec, frames)
    named = _named_in_global(spec)
    apps = [a for shot in score.shots for a in shot.appearances]
    described = [a for a in apps if a.described]
    undescribed = [a for a in apps if not a.described]
    no_global = [a for a in undescribed if a.character not in named]
    counts = {"described": len(described), "adherent": sum(bool(a.look_ok and a.motion_ok) for a in described),
              "undescribed": len(undescribed), "identity_ok": sum(bool(a.look_ok) for a in undescribed),
              "undescribed_no_global": len(no_global), "identity_no_global_ok": sum(bool(a.look_ok) for a in no_global),
              "appearances": len(apps), "look_ok": sum(bool(a.look_ok) for a in apps),
              # the look ladder over all appearances: the true colour, + its size, + its shape
              # (= look_ok), + the stated motion; each in at least half the shot's frames
              "colour_ok": sum(a.colour_present >= 0.5 for a in apps),
              "sized_ok": sum(a.sized_present >= 0.5 for a in apps),
              "look_motion_ok": sum(bool(a.look_ok and a.motion_ok) for a in apps)}
    shots = [{"background_ok": sh.background_ok, "smooth_ok": sh.smooth_ok, "extra": int(sh.extra),
              "appearances": [{"character": spec.characters[a.character].name, "described": bool(a.described),
                               "action": a.action, "present": round(float(a.present), 3), "look_ok": bool(a.look_ok),
                               "motion_ok": bool(a.motion_ok), "wrong_look": bool(a.wrong_look)}
                              for a in sh.appearances]}
             for sh in score.shots]
    return {"adherence": score.adherence, "identity": score.identity, "identity_no_global": score.identity_no_global,
            "background": score.background, "smoothness": score.smoothness,
            "extra": float(np.mean([sh.extra for sh in score.shots])), "counts": counts, "shots": shots}


def codec_check(model: StoryModel, spec: StorySpec, truth: torch.Tensor) -> dict:
    """Ground truth (S, F, H, W, 3) uint8 scored as drawn and after the model's codec
    (encode -> decode): are the shapes still recognisable?"""
    drawn = score_frames(spec, list(truth.numpy()))
    with torch.no_grad():
        coded = [model.codec.decode(model.codec.encode(truth[s])).numpy() for s in range(truth.shape[0])]
    return {"ground_truth": _compact(drawn), "codec": _compact(score_frames(spec, coded))}


def _compact(scored: dict) -> dict:
    return {k: scored[k] for k in (*METRICS, "extra", "counts")}


# ---- one story -----------------------------------------------------------------------------------

def run_story(model: StoryModel, spec: StorySpec, names: str, config: BenchConfig, backend: str) -> dict:
    """Render and score one story in every (variant, mode); the codec check on its ground truth."""
    truth = story_frames(spec, config.height, config.width)
    row = {"seed": spec.seed, "names": names, "num_shots": len(spec.shots), "global_caption": spec.global_caption,
           "captions": [shot.caption for shot in spec.shots], "codec_check": codec_check(model, spec, truth),
           "runs": []}
    for variant in config.variants:
        shared = None  # isolated: one-shot stories, so every mode is the same computation: run it once
        for mode in config.modes:
            story = to_story(spec, **story_settings(variant, mode, backend, config))
            if variant == "isolated" and shared is not None:
                rendered, scored, score_seconds = shared
            else:
                rendered = render_isolated(model, story) if variant == "isolated" else render(model, story)
                started = time.perf_counter()
                scored = score_frames(spec, rendered.frames)
                score_seconds = time.perf_counter() - started
                shared = rendered, scored, score_seconds
            routing = None
            if variant == "moc":
                routing = routing_follows_story(spec, rendered.routed, rendered.shot_chunks, story.settings.moc.top_k)
            row["runs"].append({"variant": variant, "mode": mode, "seconds": round(rendered.seconds, 3),
                                "score_seconds": round(score_seconds, 3), "sparsity": sparsity(rendered),
                                "backends": rendered.backends, "routing": routing, **scored})
    return row


# ---- memory experiments: regenerate a middle shot -----------------------------------------------

@torch.no_grad()
def _regenerate(model: StoryModel, story: Story, latents: dict[int, torch.Tensor], m: int, seed: int,
                both_sides: bool, open_top_k: int = 0) -> np.ndarray:
    """Shot m sampled again (seed `seed`) with the other shots' latents as fixed context, as the
    engine regenerates: earlier shots only, or (both_sides) the later ones too (open_top_k:
    SamplerOptions.open_top_k)."""
    sampler = StorySampler(model, story, options=SamplerOptions(preview=False, open_top_k=open_top_k))
    seeds = [shot.seed for shot in story.shots]
    for j in range(m):
        sampler.encode_context(j, latents[j], context_noise_seed(seeds[j]))
    if both_sides:
        sampler.hold_context(m)
        for j in range(m + 1, len(seeds)):
            sampler.encode_context(j, latents[j], context_noise_seed(seeds[j]), exclude=(m,))
    out, _, _ = sampler.sample(Run((m,), (seed,)), context_after=both_sides)
    return model.codec.decode(out[m]).numpy()


def memory_experiment(model: StoryModel, spec: StorySpec, config: BenchConfig, backend: str) -> dict | None:
    """Issue 9's comparisons on one story (shot by shot, MoC): its middle shot m, if it names a
    character without its look, regenerated with a new seed three ways: earlier shots as context;
    earlier and later shots (both sides); earlier shots with memory pins on the shots where its
    characters were introduced; and with config.open_top_k > 0 a fourth, both sides with the later
    chunks in a top-k of their own ("both_sides_split"). Identity = the share of m's look-less
    appearances that keep their look (score_shot's look_ok)."""
    m = len(spec.shots) // 2
    named = [a.character for a in spec.shots[m].appearances if not a.described]
    if len(spec.shots) < 3 or not named:
        return None
    story = to_story(spec, **story_settings("moc", "shot_by_shot", backend, config))
    with torch.no_grad():
        latents, _ = sample_shot_by_shot(StorySampler(model, story, options=SamplerOptions(preview=False)),
                                         [shot.seed for shot in story.shots])
    seed = (story.shots[m].seed + 1) % (2**32 - 1)

    def identity(frames: np.ndarray) -> list[bool]:
        return [bool(a.look_ok) for a in score_shot(spec, m, frames).appearances if not a.described]
    # what a both-sided regeneration can copy: per look-less appearance of m, is its character drawn
    # with its look in the later shots (True: in every later appearance, False: not in some, None:
    # it does not come back)
    later_looks: dict[int, list[bool]] = {}
    for j in range(m + 1, len(spec.shots)):
        for a in score_shot(spec, j, model.codec.decode(latents[j]).numpy()).appearances:
            later_looks.setdefault(a.character, []).append(bool(a.look_ok))
    later_right = [all(later_looks[a.character]) if a.character in later_looks else None
                   for a in spec.shots[m].appearances if not a.described]
    earlier = identity(_regenerate(model, story, latents, m, seed, both_sides=False))
    both = identity(_regenerate(model, story, latents, m, seed, both_sides=True))
    pinned_story = Story.from_dict(story.to_dict())
    pinned_story.shots[m].pins = sorted({spec.first_shot(c) for c in named} - {m})
    pinned = identity(_regenerate(model, pinned_story.validate(), latents, m, seed, both_sides=False))
    row = {"shot": m, "pins": pinned_story.shots[m].pins, "earlier_only": earlier, "both_sides": both,
           "pinned": pinned, "later_right": later_right}
    if config.open_top_k:
        row["both_sides_split"] = identity(_regenerate(model, story, latents, m, seed, both_sides=True,
                                                       open_top_k=config.open_top_k))
        row["open_top_k"] = config.open_top_k
    return row


def summarise_memory(rows: list[dict]) -> dict:
    """Pooled over stories: identity of the regenerated middle shot each way, and the pinned
    identity on the appearances the earlier-only regeneration missed."""
    entries = [row["memory"] for row in rows if row.get("memory")]
    pool = lambda key: [ok for e in entries for ok in e[key]]  # noqa: E731
    missed = [p for e in entries for ok, p in zip(e["earlier_only"], e["pinned"]) if not ok]
    # both sides against earlier only, split by what the later shots show of the character
    # (entries written before the split have no "later_right" and count under neither)
    split = {}
    for name, want in (("later_right", True), ("later_wrong", False), ("not_later", None)):
        pairs = [(b, e) for x in entries if "later_right" in x
                 for b, e, r in zip(x["both_sides"], x["earlier_only"], x["later_right"]) if r is want]
        split[name] = {"appearances": len(pairs), "both_sides": sum(b for b, _ in pairs),
                       "earlier_only": sum(e for _, e in pairs)}
    out = {"stories": len(entries), "appearances": len(pool("earlier_only")),
           "identity_earlier_only": _mean(pool("earlier_only")), "identity_both_sides": _mean(pool("both_sides")),
           "identity_pinned": _mean(pool("pinned")), "missed_by_routing": len(missed),
           "identity_pinned_where_missed": _mean(missed), "both_sides_by_later_shots": split}
    split_runs = [e for e in entries if "both_sides_split" in e]
    if split_runs:  # the fourth way, on the stories that ran it (their earlier-only beside it)
        out["both_sides_split"] = {
            "open_top_k": sorted({e["open_top_k"] for e in split_runs}),
            "appearances": sum(len(e["both_sides_split"]) for e in split_runs),
            "identity": _mean([ok for e in split_runs for ok in e["both_sides_split"]]),
            "identity_earlier_only": _mean([ok for e in split_runs for ok in e["earlier_only"]]),
            "identity_both_sides": _mean([ok for e in split_runs for ok in e["both_sides"]])}
    return out


# ---- summary and targets -------------------------------------------------------------------------

def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


LOOK_LADDER = (("colour", "colour_ok"), ("colour_size", "sized_ok"), ("colour_size_shape", "look_ok"),
               ("look_and_motion", "look_motion_ok"))  # (rung, the score_frames count behind it)


def look_ladder(counts: dict) -> dict:
    """The share of all appearances that reach each rung of the look ladder (score_frames' counts,
    pooled over stories); None where a count is missing or there are no appearances."""
    return {rung: _ratio(counts[key], counts["appearances"]) if key in counts else None for rung, key in LOOK_LADDER}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def summarise_runs(runs: list[dict], lengths: list[int]) -> dict:
    """One (variant, mode) over all stories: appearance scores pooled over appearances, background
    and smoothness averaged over stories, routing averaged over shots, sparsity per story length."""
    keys = set.intersection(*(set(r["counts"]) for r in runs))  # parts written before a count existed lack it
    total = {k: sum(r["counts"][k] for r in runs) for k in runs[0]["counts"] if k in keys}
    routing = [e for r in runs for e in (r["routing"] or []) if e["share"] is not None]
    by_length = {}
    for n in sorted(set(lengths)):
        by_length[str(n)] = _mean([r["sparsity"] for r, length in zip(runs, lengths) if length == n])
    share, chance = _mean([e["share"] for e in routing]), _mean([e["chance"] for e in routing])
    return {
        "adherence": _ratio(total["adherent"], total["described"]),
        "identity": _ratio(total["identity_ok"], total["undescribed"]),
        "identity_no_global": _ratio(total["identity_no_global_ok"], total["undescribed_no_global"]),
        "background": _mean(r["background"] for r in runs),
        "smoothness": _mean(r["smoothness"] for r in runs),
        "extra": _mean(r["extra"] for r in runs),
        "routing_share": share, "routing_chance": chance,
        "routing_share_over_chance": _mean([e["share_over_chance"] for e in routing]),
        "routing_share_over_chance_of_means": share / chance if share is not None and chance else None,
        "routing_shots": len(routing),
        "sparsity_by_length": by_length, "sparsity_8_shots": by_length.get("8"),
        "seconds_per_story": _mean(r["seconds"] for r in runs),
        "look_ladder": look_ladder(total),
        "counts": total,
    }


def _average(parts: list[dict]) -> dict:
    """Field by field mean of per-mode summaries (None where no mode has a value)."""
    out = {}
    for key, value in parts[0].items():
        if key in ("sparsity_by_length", "look_ladder"):
            out[key] = {n: _mean([p[key][n] for p in parts if p[key][n] is not None]) for n in value}
        elif key == "counts":
            out[key] = {n: sum(p[key][n] for p in parts) for n in value}
        elif key == "routing_shots":
            out[key] = sum(p[key] for p in parts)
        else:
            out[key] = _mean([p[key] for p in parts])
    return out


def summarise(rows: list[dict], config: BenchConfig) -> dict:
    lengths = [row["num_shots"] for row in rows]
    by_mode = {mode: {variant: summarise_runs([next(r for r in row["runs"] if r["variant"] == variant
                                                     and r["mode"] == mode) for row in rows], lengths)
                      for variant in config.variants} for mode in config.modes}
    summary = {variant: _average([by_mode[mode][variant] for mode in config.modes]) for variant in config.variants}
    summary["by_mode"] = by_mode
    return summary


def _target(name: str, measured: float | None, threshold: float, rule: str, **extra) -> dict:
    ok = None if measured is None else bool(measured >= threshold)
    return {"target": name, "measured": measured, "threshold": threshold, "rule": rule, "pass": ok, **extra}


def targets(summary: dict) -> list[dict]:
    """The issue's targets with the measured values; pass is None where the run did not measure it."""
    moc, isolated = summary.get("moc"), summary.get("isolated")
    by_mode = summary["by_mode"]
    out = []
    for metric, threshold in (("adherence", ADHERENCE_TARGET), ("identity", IDENTITY_TARGET)):
        out.append(_target(f"moc {metric}", moc and moc[metric], threshold, f"MoC {metric} >= {threshold}",
                           by_mode={m: v["moc"][metric] for m, v in by_mode.items() if "moc" in v}))
    gaps = {f"{mode}/{metric}": v["moc"][metric] - v["dense"][metric]
            for mode, v in by_mode.items() if "moc" in v and "dense" in v
            for metric in METRICS if v["moc"][metric] is not None and v["dense"][metric] is not None}
    worst = min(gaps, key=gaps.get) if gaps else None
    out.append(_target("moc vs dense", gaps[worst] if worst else None, -DENSE_MARGIN,
                       f"MoC - dense >= -{DENSE_MARGIN} on every metric in every mode (measured: the worst)",
                       worst=worst, gaps=gaps))
    gain = None
    if moc and isolated and moc["identity"] is not None and isolated["identity"] is not None:
        gain = moc["identity"] - isolated["identity"]
    out.append(_target("memory gain", gain, MEMORY_GAIN, f"identity(moc) - identity(isolated) >= {MEMORY_GAIN}"))
    out.append(_target("routing follows the story", moc and moc["routing_share_over_chance"], ROUTING_TARGET,
                       f"routed share into shots showing the named character >= {ROUTING_TARGET} x chance",
                       share=moc and moc["routing_share"], chance=moc and moc["routing_chance"]))
    joint = by_mode.get("joint", {}).get("moc")
    out.append(_target("sparsity, 8 shots", joint and joint["sparsity_8_shots"], SPARSITY_TARGET,
                       f"1 - attention density on 8-shot stories >= {SPARSITY_TARGET}, joint mode (the whole story "
                       "is one sequence; shot by shot a shot's keys are only the shots up to it)",
                       by_mode={m: v["moc"]["sparsity_8_shots"] for m, v in by_mode.items() if "moc" in v}))
    return out


def codec_summary(rows: list[dict]) -> dict:
    out = {}
    for kind in ("ground_truth", "codec"):
        checks = [row["codec_check"][kind] for row in rows]
        total = {k: sum(c["counts"][k] for c in checks) for k in checks[0]["counts"]}
        out[kind] = {"look_ok": _ratio(total["look_ok"], total["appearances"]),
                     "adherence": _ratio(total["adherent"], total["described"]),
                     "identity": _ratio(total["identity_ok"], total["undescribed"]),
                     "background": _mean(c["background"] for c in checks),
                     "smoothness": _mean(c["smoothness"] for c in checks)}
    return {"look_ok": out["codec"]["look_ok"], **out}


# ---- the benchmark -------------------------------------------------------------------------------

def run_benchmark(model: StoryModel, config: BenchConfig, log=sys.stderr, checkpoint: Path | None = None) -> dict:
    """Every story in every (variant, mode); returns the JSON document (config, summary, targets,
    codec check, stories). checkpoint: rewrite the document there after every story, so a run
    that is stopped (a GPU call's time running out) still leaves every finished story to merge."""
    for name, given, allowed in (("modes", config.modes, MODES), ("variants", config.variants, VARIANTS)):
        if not given or any(x not in allowed for x in given):
            raise ValueError(f"{name} must be a non-empty subset of {list(allowed)}, got {list(given)}")
    if config.stories < 1:
        raise ValueError(f"stories must be >= 1, got {config.stories}")
    index, count = config.shard
    if not 0 <= index < count:
        raise ValueError(f"shard must be I/N with 0 <= I < N, got {index}/{count}")
    specs = benchmark_specs(config)[index::count]
    defaults = GenerationSettings()
    backend, why = moc_backend(model)
    print(f"MoC backend: {backend} ({why})", file=log, flush=True)
    moc = story_settings("moc", config.modes[0], backend, config)["moc"]
    started = time.perf_counter()

    def document(rows):
        return _document(rows, config, {
            "model": model.name, "model_identity": model.identity, "trained": model.trained,
            "codec": model.codec.name, "device": str(model.device), "dtype": str(model.dtype),
            "torch": torch.__version__, "date": datetime.date.today().isoformat(),
            "steps": config.steps or defaults.steps, "guidance": config.guidance or defaults.guidance,
            "context_noise": defaults.context_noise if config.context_noise is None else config.context_noise,
            "height": config.height, "width": config.width, "frames": config.frames,
            "seed_offset": config.seed_offset, "shard": f"{index}/{count}",
            "names": "train for even story indices, heldout for odd", "length_cycle": list(LENGTH_CYCLE),
            "modes": list(config.modes), "variants": list(config.variants), "moc": asdict(moc),
            "open_top_k": config.open_top_k,
            "moc_backend": why,
            "isolated": "one render per story, reported under every mode (1-shot stories: the modes agree)",
            "seconds": round(time.perf_counter() - started, 1)})

    rows = []
    for i, (spec, names) in enumerate(specs):
        if config.time_limit and time.perf_counter() - started > config.time_limit:
            print(f"time limit: {i} of {len(specs)} stories done", file=log, flush=True)
            break
        rows.append(run_story(model, spec, names, config, backend))
        if config.memory:
            rows[-1]["memory"] = memory_experiment(model, spec, config, backend)
        elapsed = time.perf_counter() - started
        runs = " ".join(f"{r['variant']}/{r['mode']} {r['seconds']:.1f}s adh {_fmt(r['adherence'])} "
                        f"id {_fmt(r['identity'])}" for r in rows[-1]["runs"])
        print(f"story {i + 1}/{len(specs)} seed {spec.seed} ({len(spec.shots)} shots, {names} names): {runs} | "
              f"{elapsed:.0f}s, ~{elapsed / (i + 1) * (len(specs) - i - 1):.0f}s left", file=log, flush=True)
        if checkpoint is not None:
            _write_atomic(document(rows), checkpoint)
    if not rows:
        raise RuntimeError(f"no story finished inside the time limit ({config.time_limit} s)")
    return document(rows)


def _write_atomic(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)


def _document(rows: list[dict], config: BenchConfig, head: dict) -> dict:
    """The JSON document of finished story rows: head (the run's config) with the story count and
    seeds, then summary, targets, codec check and the rows."""
    summary = summarise(rows, config)
    if config.memory:
        summary["memory"] = summarise_memory(rows)
    head = {**head, "stories": len(rows), "seeds": [row["seed"] for row in rows]}
    return {"config": head, "summary": summary, "targets": targets(summary),
            "codec_check": codec_summary(rows), "stories": rows}


def merge_results(documents: list[dict]) -> dict:
    """One document from shards of one run (--shard i/n, same model and settings), from runs of
    further stories (another --seed-offset, seeds not overlapping), or from runs of other variants
    on the same stories (--variants moc, then dense, ...: each story's runs joined, a story kept
    only where every variant finished it): the story rows in seed order, every summary recomputed;
    seconds is the slowest shard's; seed_offsets lists the runs'."""
    if not documents:
        raise ValueError("nothing to merge")
    head = dict(documents[0]["config"])
    keys = ("model_identity", "steps", "guidance", "context_noise", "top_k", "height", "width", "frames", "modes")
    unrecorded = {"context_noise": GenerationSettings().context_noise}  # runs from before it was recorded

    def setting(config: dict, key: str):
        return config["moc"]["top_k"] if key == "top_k" else config.get(key, unrecorded.get(key))
    for doc in documents[1:]:
        differing = [k for k in keys if setting(doc["config"], k) != setting(head, k)]
        if differing:
            raise ValueError(f"cannot merge runs that differ in {differing}")
    groups: dict[tuple[str, ...], list[dict]] = {}  # variant set -> its documents
    for doc in documents:
        groups.setdefault(tuple(doc["config"]["variants"]), []).append(doc)
    pooled = {}
    for variants, docs in groups.items():
        rows = [row for doc in docs for row in doc["stories"]]
        seeds = [row["seed"] for row in rows]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"the shards of variants {list(variants)} overlap (a seed appears twice)")
        pooled[variants] = {row["seed"]: row for row in rows}
    sets = list(pooled)
    if len({v for vs in sets for v in vs}) != sum(len(vs) for vs in sets):
        raise ValueError(f"runs of overlapping variant sets {[list(vs) for vs in sets]} cannot be joined")
    common = sorted(set.intersection(*(set(p) for p in pooled.values())))
    if not common:
        raise ValueError("the runs of different variants share no story")
    variants = tuple(v for v in VARIANTS if any(v in vs for vs in sets))
    rows = []
    for seed in common:
        row = dict(pooled[sets[0]][seed])
        row["runs"] = sorted((r for vs in sets for r in pooled[vs][seed]["runs"]),
                             key=lambda r: (variants.index(r["variant"]), head["modes"].index(r["mode"])))
        if any("memory" in pooled[vs][seed] for vs in sets):
            row["memory"] = next(pooled[vs][seed]["memory"] for vs in sets if "memory" in pooled[vs][seed])
        rows.append(row)
    config = BenchConfig(modes=tuple(head["modes"]), variants=variants,
                         memory=any("memory" in row for row in rows))
    offsets = sorted({o for d in documents for o in d["config"].get("seed_offsets", [d["config"]["seed_offset"]])})
    head.update(shard=f"{len(documents)} shards merged", seconds=max(d["config"]["seconds"] for d in documents),
                seed_offset=offsets[0], seed_offsets=offsets, variants=list(variants))
    return _document(rows, config, head)


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def print_report(result: dict) -> None:
    config, summary = result["config"], result["summary"]
    print(f"quality: {config['stories']} stories, {config['height']}x{config['width']}, "
          f"{config['frames']} frames/shot, {config['steps']} steps, guidance {config['guidance']}, "
          f"{config['model']} on {config['device']}")
    print(f"{'variant':9} {'mode':13} {'adherence':>9} {'identity':>8} {'id-noglob':>9} {'backgrnd':>8} "
          f"{'smooth':>7} {'extra':>5} {'share':>6} {'chance':>6} {'sh/ch':>6} {'sparse@8':>8} {'s/story':>8}")
    for mode in config["modes"]:
        for variant in config["variants"]:
            s = summary["by_mode"][mode][variant]
            print(f"{variant:9} {mode:13} {_fmt(s['adherence']):>9} {_fmt(s['identity']):>8} "
                  f"{_fmt(s['identity_no_global']):>9} {_fmt(s['background']):>8} {_fmt(s['smoothness']):>7} "
                  f"{_fmt(s['extra'], 1):>5} {_fmt(s['routing_share'], 2):>6} {_fmt(s['routing_chance'], 2):>6} "
                  f"{_fmt(s['routing_share_over_chance'], 2):>6} {_fmt(s['sparsity_8_shots']):>8} "
                  f"{_fmt(s['seconds_per_story'], 1):>8}")
    if "moc" in config["variants"]:
        lengths = list(summary["by_mode"][config["modes"][0]]["moc"]["sparsity_by_length"])
        print("MoC sparsity by story length: " + " ".join(f"{n:>6}" for n in lengths))
        for mode in config["modes"]:
            by_length = summary["by_mode"][mode]["moc"]["sparsity_by_length"]
            print(f"  {mode:27} " + " ".join(f"{_fmt(by_length[n]):>6}" for n in lengths))
    ladder_rows = [(mode, variant, summary["by_mode"][mode][variant].get("look_ladder"))
                   for mode in config["modes"] for variant in config["variants"]]
    if any(ladder and ladder.get("colour") is not None for _, _, ladder in ladder_rows):
        print("where looks fail (share of all appearances, in >= half the frames): colour, + size, + shape, + motion")
        for mode, variant, ladder in ladder_rows:
            if ladder and ladder.get("colour") is not None:
                print(f"  {variant:9} {mode:13} " + " ".join(f"{_fmt(ladder[k]):>6}" for k in
                                                          ("colour", "colour_size", "colour_size_shape", "look_and_motion")))
    codec = result["codec_check"]
    print(f"codec check (ground truth -> encode -> decode): look_ok {_fmt(codec['look_ok'])} "
          f"(drawn ground truth: {_fmt(codec['ground_truth']['look_ok'])})")
    memory = summary.get("memory")
    if memory:
        print(f"regenerating a middle shot ({memory['stories']} stories, {memory['appearances']} look-less "
              f"appearances), identity: earlier shots only {_fmt(memory['identity_earlier_only'])}, both sides "
              f"{_fmt(memory['identity_both_sides'])}, pinned to the introductions {_fmt(memory['identity_pinned'])}; "
              f"where routing alone missed ({memory['missed_by_routing']}), pinned "
              f"{_fmt(memory['identity_pinned_where_missed'])}")
        split = memory.get("both_sides_by_later_shots")
        if split:
            print("  kept with both sides / earlier only, by what the later shots show of the character: "
                  + "; ".join(f"{label} {split[k]['both_sides']} / {split[k]['earlier_only']} of {split[k]['appearances']}"
                              for k, label in (("later_right", "drawn right"), ("later_wrong", "drawn wrong"),
                                               ("not_later", "not there"))))
        split_way = memory.get("both_sides_split")
        if split_way:
            print(f"  both sides with the later chunks in a top-{'/'.join(map(str, split_way['open_top_k']))} of "
                  f"their own: identity {_fmt(split_way['identity'])} of {split_way['appearances']} (earlier only "
                  f"{_fmt(split_way['identity_earlier_only'])}, both sides {_fmt(split_way['identity_both_sides'])})")
    for t in result["targets"]:
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[t["pass"]]
        print(f"  {verdict:4} {t['target']:27} measured {_fmt(t['measured'])}  ({t['rule']})")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the shipped default)")
    parser.add_argument("--stories", type=int, default=100)
    parser.add_argument("--steps", type=int, default=None, help="default: the story default")
    parser.add_argument("--guidance", type=float, default=None, help="default: the story default")
    parser.add_argument("--top-k", type=int, default=None, help="MoC's routed chunks per query (default: the story "
                        "default); tune such settings on stories of another --seed-offset, never on the reported ones")
    parser.add_argument("--context-noise", type=float, default=None,
                        help="shot by shot: the context shots' noise level (default: the story default)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--frames", type=int, default=8, help="latent frames per shot")
    parser.add_argument("--seed-offset", type=int, default=0)
    parser.add_argument("--shard", default="0/1", help="I/N: run stories I, I+N, ... (merge the JSONs with --merge)")
    parser.add_argument("--time-limit", type=float, default=0.0, help="seconds; start no story after this")
    parser.add_argument("--merge", type=Path, nargs="+",
                        help="pool these JSONs into --json (shards, further seeds, or other variants on the "
                             "same stories); renders nothing")
    parser.add_argument("--memory", action="store_true",
                        help="also regenerate each story's middle shot: earlier-only, both sides, pinned")
    parser.add_argument("--open-top-k", type=int, default=0,
                        help="with --memory: also both sides with the later chunks in a top-k of this size of "
                             "their own (the earlier top-k kept as it is)")
    args = parser.parse_args(argv)
    if args.merge:
        result = merge_results([json.loads(p.read_text()) for p in args.merge])
        return _finish(result, args.json)
    try:
        shard = tuple(int(x) for x in args.shard.split("/"))
        assert len(shard) == 2 and shard[1] >= 1
    except (ValueError, AssertionError):
        parser.error(f"--shard must look like 0/4, got {args.shard!r}")
    config = BenchConfig(stories=args.stories, steps=args.steps, guidance=args.guidance, top_k=args.top_k,
                         context_noise=args.context_noise,
                         modes=tuple(args.modes.split(",")), variants=tuple(args.variants.split(",")),
                         height=args.height, width=args.width, frames=args.frames, seed_offset=args.seed_offset,
                         memory=args.memory, shard=shard, time_limit=args.time_limit, open_top_k=args.open_top_k)
    model = StoryModel.load(args.model, device=args.device)
    return _finish(run_benchmark(model, config, checkpoint=args.json), args.json)


def _finish(result: dict, json_path: Path | None) -> dict:
    print_report(result)
    if json_path:
        _write_atomic(result, json_path)
        print(f"wrote {json_path}")
    return result


if __name__ == "__main__":
    main()
