"""The story engine: what the app and the CLI call to turn a Story into videos.

For: `StoryEngine.load(...)` and `render(story, regenerate=..., out_dir=..., on_event=..., stop=...)`:
plan which shots come from the shot cache and which are sampled (in which runs), run the
sampler, store every finished take at once, write per-shot and whole-story MP4s, the routing
report and the summary; a shot's takes (`takes`, `make_current`, `current_takes`, `take_video`).
A take's MP4 is encoded once and kept in the shot cache: a cached shot's is copied from there, and
story.mp4 joins the shots' MP4s without encoding them again (it is encoded from the frames only
where they cannot be joined; the summary's "story_video_from" says which).
Also `available_backends()`, the cache statistics, and the current takes read without rendering
(`current_routing`, `take_pictures`: the recall pictures). With several ranks (engine/parallel.py)
rank 0 plans, serves cached takes and does all the file work; the other ranks compute in step,
keep no shot cache and write nothing (`writes`).
Not for: the sampling loop (sampler.py), the model (model.py, backbone.py), UI (app/).

Takes and keys. A shot's *take* (frames + latents + routing) is stored under a key that hashes
everything that determined it: model identity, every output-changing setting, the global
caption, the shot's caption, length and seed, the keys of the shots before it (its context),
its position in the joint run that made it, and (where attention is not causal across shots)
the run's other shots. A *slot* (the same minus the seed actually drawn for seed = -1) points
at the current take, so a second identical request is a cache hit even with random seeds; a
*loose slot* (position and the shot's own fields only, no context) points at the latest take
of that shot, which is what "stale" and locked shots show. A *takes slot* (position, caption,
length and the common settings; any seed, context or pins) keeps the history of the shot's takes,
oldest first (at most MAX_HISTORY, evicted takes skipped): every sampled take is added to it.
A story may remember a shot's current take (`Shot.take`, a key). It is shown, instead of what
the slot points at, while its context is the one it was made or made current for; a locked or
stale shot shows it while it is a take of that shot; a remembered take the cache no longer holds
is sampled anew (the summary's "takes_gone" lists those shots).
Render rules:
  * normal: shots whose slot has a take are "cached"; from the first shot without one on,
    shots are sampled (joint: together, in runs; shot_by_shot: one at a time), except locked
    shots that already have a take of the same caption, which stay ("stale" if their context
    changed).
  * regenerate=i: shots before i as in a normal render, shot i sampled anew with the earlier
    shots as fixed context (with a fixed seed the result is deterministic, so an existing take
    with the same key is reused), shots after i kept ("cached" if their context is unchanged, else
    "stale": the caller decides whether to regenerate them).
  * regenerate=i with both sides (the default where every later shot has a take, MoC is on and
    the context K/V cache is used): the shots after i are context too (encoded from their takes
    without looking at shot i), shot i may route into them, and they stay "cached", not stale;
    shot i's key then also hashes their keys.
  * make_current(i, key) (`render(regenerate=i, take=key)`): like regenerate=i, but shot i is an
    earlier take instead of a sampled one; later shots are "cached" where their slot (with this
    take as context) has a take, else "stale" (or kept, "cached", if that take was itself made
    with both sides as context).
Otherwise context is the story prefix: a shot never conditions on a later one.
"""

from __future__ import annotations

import errno
import gc
import hashlib
import json
import random
import shutil
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.profiler import record_function

from engine.events import (Finished, Preview, Progress, RenderResult, RenderStopped, ShotDone, ShotResult,
                           Stopped)
from engine.codec import middle_video_frame
from engine.context_cache import ContextKV
from engine.model import StoryModel
from engine.parallel import SequenceParallel, check_heads
from engine.moc.attention import resolve_backend, triton_available
from engine.routing_report import ShotRouting, build_report, recorded_steps
from engine.sampler import Run, SamplerOptions, StepInfo, StorySampler
from engine.shot_cache import MAX_HISTORY, ShotCache, Take
from engine.story import MAX_SEED, Story, StoryError, atomic_write_text, json_text
from engine.video import concat_mp4, copy_mp4, write_mp4

DECODE_RANGE = "storyboard.decode"  # profiler range of a shot's latents -> frames (benchmarks/cpu_profile.py)

KEY_VERSION = 1  # bump when sampling changes so old takes stop matching
DEFAULT_CACHE_DIR = Path(__file__).resolve().parent.parent / "cache"
KEEP_RENDERS = 20  # render folders kept under <cache_dir>/renders when no out_dir is given


def _loose(common: str, index: int, shot) -> str:
    """The loose slot of a shot: its position and its own fields, no context."""
    return _hash("loose", common, index, shot.caption, shot.frames, shot.seed)


def _takes_slot(common: str, index: int, shot) -> str:
    """The history of a shot's takes: its position, caption and length (any seed, context or pins)."""
    return _hash("takes", common, index, shot.caption, shot.frames)


def _links(shot) -> list:
    """What a shot's memory pins add to its keys (nothing without pins: older takes stay valid)."""
    return [("pins", sorted(shot.pins), "blocks", sorted(shot.blocks))] if shot.pins or shot.blocks else []


def generated_with(run: Run) -> str:
    """How a take was sampled: "joint" (with other live shots), "context" (alone, against earlier
    shots as fixed context) or "single" (alone, no context)."""
    return "joint" if len(run.shots) > 1 else ("context" if run.start > 0 else "single")


def context_noise_seed(seed: int) -> int:
    """Seed of the noise a context shot is re-noised with: a function of its own seed only
    (decorrelated from the initial noise of any shot)."""
    return int(hashlib.sha256(f"context-noise:{seed}".encode()).hexdigest()[:15], 16)


def context_pass_key(previous: str, shots: list, exclude: tuple[int, ...] = ()) -> str:
    """Names what one context pass reads: `previous` (the key of the pass before it in the render's
    order, or the story's common key for the first), and for each shot of the pass its take key,
    caption, frames and memory links (a locked shot keeps its take under new links), plus the
    shots it must not see. Equal keys: equal K/V, so a kept cache's pass need not run again."""
    return _hash("context", previous, [(take, shot.caption, shot.frames, *_links(shot)) for take, shot in shots],
                 sorted(exclude))


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:40]


@dataclass
class _Planned:
    index: int
    status: str  # "cached" | "stale" | "generate"
    seed: int
    key: str = ""
    slot: str = ""
    loose: str = ""
    run: int = -1  # index into the run list (generate only)
    run_offset: int = 0  # position inside its run
    take: Take | None = None
    repoint: bool = False  # a later shot kept by a both-sided regeneration: its new slot points at its take
    takes: str = ""  # the takes slot (history of this shot's takes)
    chosen: bool = False  # made current by make_current: its slot and loose slot point at it
    gone: bool = False  # the story remembered a take of this shot that the cache no longer holds


@dataclass(frozen=True)
class TakeInfo:
    """One take of a shot, as `StoryEngine.takes` lists it."""

    key: str  # the take's shot cache key (what Shot.take remembers)
    number: int  # 1 = the oldest take of this shot still cached
    seed: int  # the seed its initial noise was drawn with
    caption: str  # the shot's caption when it was made
    created: float  # when it was made (Unix time; 0 if unknown)
    generated_with: str  # "joint" | "context" | "single" (see `generated_with`)
    both_sides: bool  # it was made with the later shots as context too
    current: bool  # what a render of the story shows for this shot now


def reading_progress(run, index: int, runs: int, steps: int, shots: list[int], i: int, n: int,
                     kept: bool = False) -> Progress:
    """The event of context pass i of n before run `index` (of `runs`): `shots` read as context,
    or (kept) found in the context K/V cache the last render kept."""
    label = f"shot {shots[0] + 1}" if len(shots) == 1 else f"shots {shots[0] + 1}-{shots[-1] + 1}"
    what = f"{label} as context, kept from the last render" if kept else f"reading {label} as context"
    return Progress(shot=run.shots[0] if len(run.shots) == 1 else None, step=0, total=steps, run=index, runs=runs,
                    shots=run.shots, context=shots[0], context_shots=tuple(shots),
                    message=f"run {index + 1}/{runs}: {what} ({i + 1} of {n})")


class StoryEngine:
    def __init__(self, model: StoryModel, cache: ShotCache | None, cache_dir: Path,
                 options: SamplerOptions = SamplerOptions(), parallel: SequenceParallel | None = None):
        self.model = model
        self.cache = cache  # ShotCache: .stats() -> hits / misses / entries / bytes; None on ranks other than 0
        self.cache_dir = cache_dir
        self.options = options
        # sequence parallelism: every rank renders the same story in step; rank 0 decides what is
        # sampled, serves cached takes and writes every file (`writes`), every transformer forward
        # is spread over the ranks
        self.parallel = parallel
        if parallel is not None:
            check_heads(model.transformer.num_heads, parallel.world)
        if cache is None and self.writes:
            raise ValueError("a StoryEngine needs a ShotCache; only a rank other than 0 of a sequence-parallel "
                             "group goes without (rank 0's cache serves it)")
        self._lock = threading.Lock()  # one render at a time per engine
        # the context K/V cache the last render filled (SamplerOptions.keep_context): the next
        # render that reads context skips the passes it still holds
        self._kept_kv: ContextKV | None = None

    @staticmethod
    def load(model: str | Path | None = None, device: str = "auto", cache_dir: str | Path | None = None,
             dtype: torch.dtype | None = None, cache_bytes: int = 4 << 30,
             options: SamplerOptions = SamplerOptions(), parallel: SequenceParallel | None = None) -> "StoryEngine":
        """model: None = the shipped default (assets/default_model), or a local folder.
        parallel: the sequence-parallel group this process renders with (engine.parallel.start)."""
        m = StoryModel.load(model, device=device, dtype=dtype)
        cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
        writes = parallel is None or parallel.rank == 0  # the other ranks keep no cache (not even its folders)
        cache = ShotCache(cache_dir / "shots", max_bytes=cache_bytes) if writes else None
        return StoryEngine(m, cache, cache_dir, options, parallel)

    @property
    def model_name(self) -> str:
        return self.model.name

    @property
    def writes(self) -> bool:
        """Whether this process does the file work of a render (MP4s, the shot cache, the routing
        report and summary): one process, or rank 0. The other ranks compute in step and write nothing."""
        return self.parallel is None or self.parallel.rank == 0

    def available_backends(self) -> list[str]:
        names = ["auto", "reference", "dense", "chunked"]
        try:
            from engine.moc import flex  # noqa: F401
            names.append("flex")
        except ImportError:
            pass
        if triton_available()[0] and self.model.device.type == "cuda":
            names.append("triton")
        return names

    # ---- checks and keys ----------------------------------------------------------------------

    def check(self, story: Story) -> None:
        """Model-specific validation on top of Story.validate (raises StoryError)."""
        story.validate()
        tr, codec = self.model.transformer, self.model.codec
        _, ph, pw = tr.patch_size
        for name, patch in (("height", ph), ("width", pw)):
            multiple = codec.spatial * patch
            value = getattr(story.settings, name)
            if value % multiple:
                raise StoryError(f"settings.{name}", f"must be a multiple of {multiple} for model "
                                 f"{self.model_name}, got {value}")
        total = sum(s.frames for s in story.shots)
        limit = tr.model.rope.max_seq_len
        if total > limit:
            raise StoryError("shots", f"the story has {total} latent frames; this model allows at most {limit}")
        try:
            resolve_backend(story.settings.moc.backend, self.model.device)
        except ValueError as err:
            raise StoryError("settings.moc.backend", f"{err}; available: {self.available_backends()}") from None

    def _common(self, story: Story) -> str:
        s = story.settings
        moc = asdict(s.moc) if s.moc.enabled else {"enabled": False}
        if s.moc.enabled:
            moc["backend"] = resolve_backend(s.moc.backend, self.model.device)
        return _hash("common", KEY_VERSION, self.model.identity, str(self.model.dtype), self.model.device.type,
                     s.steps, s.guidance, s.height, s.width, s.mode, s.context_noise, s.negative_caption, moc,
                     story.global_caption, self.options.context_cache)

    def _sees_later(self, story: Story) -> bool:
        moc = story.settings.moc
        return not (moc.enabled and moc.causal)

    # ---- planning -----------------------------------------------------------------------------

    def both_sides(self, story: Story, regenerate: int | None, asked: bool | None = None) -> tuple[bool, str]:
        """Whether regenerating shot `regenerate` may also see the shots after it (fixed, as they
        are now), and why not. asked None: yes whenever it can."""
        if regenerate is None or asked is False:
            return False, "" if regenerate is None else "not asked for"
        S = len(story.shots)
        why = ""
        if regenerate >= S - 1:
            why = "it is the last shot"
        elif not story.settings.moc.enabled:
            why = "it needs MoC routing (settings.moc.enabled)"
        elif not self.options.context_cache:
            why = "it needs the context K/V cache"
        else:
            common = self._common(story)
            missing = [j for j in range(regenerate + 1, S)
                       if self.cache.pointer(_loose(common, j, story.shots[j])) is None]
            if missing:
                why = f"shot {missing[0] + 1} has no take yet (generate the story first)"
        if why and asked:
            raise StoryError("both_sides", f"cannot regenerate shot {regenerate + 1} with the later shots as "
                                           f"context: {why}")
        return not why, why

    def plan(self, story: Story, regenerate: int | None = None, both_sides: bool = False,
             take: str | None = None) -> tuple[list[_Planned], list[Run]]:
        """Decide, for every shot, cached / stale / generate, the runs and the keys. No sampling.
        both_sides (with regenerate): the later shots keep their current takes, are not stale,
        and are context of the regenerated shot (check `self.both_sides` first). take (with
        regenerate): shot `regenerate` is this cached take instead of a sampled one."""
        if regenerate is not None:
            self._shot_index(story, regenerate, "regenerate")
        both_sides = bool(both_sides) and regenerate is not None
        common = self._common(story)
        joint = story.settings.mode == "joint"
        rng = random.SystemRandom()
        plans: list[_Planned] = []
        keys: list[str] = []
        generating = False  # joint: from the first sampled shot on, later shots are sampled too
        for i, shot in enumerate(story.shots):
            slot = _hash("slot", common, shot.caption, shot.frames, shot.seed, keys, *_links(shot))
            loose = _loose(common, i, shot)
            p = _Planned(i, "generate", shot.seed, slot=slot, loose=loose, takes=_takes_slot(common, i, shot))
            fits, ours = self._remembered(shot, p) if i != regenerate else (None, None)
            if regenerate is not None and i == regenerate and take is not None:
                p.status, p.key, p.chosen = "cached", take, True
            elif regenerate is not None and i == regenerate:
                if shot.seed != -1 and not both_sides:  # a fixed seed regenerates deterministically: reuse
                    mates = [(shot.caption, shot.frames, shot.seed)] if self._sees_later(story) else []
                    key = _hash("take", slot, shot.seed, 0, mates)
                    if self.cache.contains(key):
                        p.status, p.key = "cached", key
            elif regenerate is not None and i > regenerate:
                key = fits or self.cache.pointer(slot)
                if key is not None:
                    p.status, p.key = "cached", key
                elif (key := ours or self.cache.pointer(loose)) is not None:
                    p.status, p.key = ("cached", key) if both_sides else ("stale", key)
                    p.repoint = both_sides
            else:
                key = None if (generating and joint) or p.gone else (fits or self.cache.pointer(slot))
                if key is not None:
                    p.status, p.key = "cached", key
                elif shot.locked and (key := ours or self.cache.pointer(loose)) is not None:
                    p.status, p.key = "stale", key
            if p.status == "generate":
                generating = True
                p.seed = shot.seed if shot.seed != -1 else rng.randint(0, MAX_SEED)
                prev = plans[-1] if plans else None
                joins = (joint and prev is not None and prev.status == "generate"
                         and i != regenerate and prev.index != regenerate)
                p.run_offset = prev.run_offset + 1 if joins else 0
                p.key = _hash("take", slot, p.seed, p.run_offset, [])
            keys.append(p.key)
            plans.append(p)
        # runs: maximal groups of consecutive generated shots that share a run
        runs: list[Run] = []
        for p in plans:
            if p.status != "generate":
                continue
            if p.run_offset == 0:
                runs.append(Run(shots=(p.index,), seeds=(p.seed,)))
            else:
                runs[-1] = Run(shots=runs[-1].shots + (p.index,), seeds=runs[-1].seeds + (p.seed,))
            p.run = len(runs) - 1
        # final keys and slots: with non-causal attention a shot also depends on its later run mates
        keys = []
        for p, shot in zip(plans, story.shots):
            p.slot = _hash("slot", common, shot.caption, shot.frames, shot.seed, keys, *_links(shot))
            if p.status == "generate":
                mates = []
                if self._sees_later(story):
                    mates = [(story.shots[j].caption, story.shots[j].frames, seed)
                             for j, seed in zip(runs[p.run].shots, runs[p.run].seeds)]
                later = []
                if both_sides and p.index == regenerate:  # the later shots' takes, and how it routes to them
                    later = ["after", [q.key for q in plans[p.index + 1:]],
                             *([["open_top_k", self.options.open_top_k]] if self.options.open_top_k else [])]
                p.key = _hash("take", p.slot, p.seed, p.run_offset, mates, *later)
            keys.append(p.key)
        if both_sides:
            p = plans[regenerate]
            if story.shots[regenerate].seed != -1 and p.status == "generate" and self.cache.contains(p.key):
                p.status, p.run = "cached", -1  # a fixed seed regenerates deterministically: reuse the take
                runs = [r for r in runs if regenerate not in r.shots]
        return plans, runs

    def _remembered(self, shot, p: _Planned) -> tuple[str | None, str | None]:
        """(fits, ours) for the take the story remembers for this shot: fits = it, where its context
        is this slot's (it was made for the slot, or made current for it); ours = it, where it is a
        take of this shot at all (what a locked or stale shot shows). Marks p.gone if it left the cache."""
        if not shot.take:
            return None, None
        meta = self.cache.meta(shot.take)
        if meta is None:
            p.gone = True
            return None, None
        fits = meta.get("slot") == p.slot or self.cache.pointer(p.slot) == shot.take
        ours = fits or shot.take in self.cache.history(p.takes)
        return (shot.take if fits else None), (shot.take if ours else None)

    # ---- takes --------------------------------------------------------------------------------

    def takes(self, story: Story, index: int) -> list[TakeInfo]:
        """Shot `index`'s takes that the cache still holds, oldest first; `current` marks the one a
        render of `story` shows (none where the shot would be sampled)."""
        self.check(story)
        index = self._shot_index(story, index)
        plans, _ = self.plan(story)
        p = plans[index]
        current = p.key if p.status != "generate" else None
        keys = self.cache.history(p.takes)
        if current is not None and current not in keys:  # made before take histories existed
            keys.append(current)
        metas = [(key, self.cache.meta(key)) for key in keys]
        metas = sorted(((k, m) for k, m in metas if m is not None), key=lambda km: float(km[1].get("created", 0)))
        return [TakeInfo(key=k, number=n, seed=int(m.get("seed", -1)), caption=str(m.get("caption", "")),
                         created=float(m.get("created", 0)), generated_with=str(m.get("generated_with", "")),
                         both_sides=bool(m.get("both_sides", False)), current=k == current)
                for n, (k, m) in enumerate(metas, 1)]

    def current_takes(self, story: Story) -> list[tuple[str, str | None]]:
        """Per shot, what a render of `story` would do, without rendering: ("cached", key),
        ("stale", key), ("generate", None), or ("gone", None) where the take the story remembers
        is no longer in the cache (a render samples it anew)."""
        self.check(story)
        plans, _ = self.plan(story)
        return [(p.status, p.key) if p.status != "generate" else ("gone" if p.gone else "generate", None)
                for p in plans]

    def make_current(self, story: Story, index: int, key: str, **render_kwargs) -> RenderResult:
        """Make take `key` (one of `takes(story, index)`) shot `index`'s current take: its slot
        points at it, and the render that follows shows it without sampling it. Later shots follow
        the rules of a regeneration (module docstring). render_kwargs: out_dir, on_event, stop.
        Reads this process's cache: with several ranks, rank 0 calls `make_current_args` and sends
        the render they describe to the others (engine/ranks.py)."""
        return self.render(story, **self.make_current_args(story, index, key), **render_kwargs)

    def make_current_args(self, story: Story, index: int, key: str) -> dict:
        """The `render` arguments (regenerate, take, both_sides) that make take `key` shot `index`'s
        current take, or a StoryError if it is not one of the shot's cached takes."""
        self.check(story)
        index = self._shot_index(story, index)
        known = [t.key for t in self.takes(story, index)]
        if key not in known:
            raise StoryError(f"shots[{index}].take", f"{str(key)[:80]!r} is not a cached take of shot {index + 1}; "
                             f"its takes are {known} (list them with `takes`)")
        both = None if (self.cache.meta(key) or {}).get("both_sides") else False
        return {"regenerate": index, "take": key, "both_sides": both}

    def take_video(self, key: str, path: str | Path, fps: int) -> Path | None:
        """Write a cached take's MP4 at `path` (a copy of the one the cache keeps, else encoded from
        its frames); None if the cache no longer holds it."""
        copied = self._copy_cached_video(key, Path(path), fps)
        if copied is not None:
            return copied
        take = self.cache.read(key)  # looking at a take is not reusing it: no hit, no LRU touch
        return None if take is None else write_mp4(Path(path), take.frames, fps)

    @staticmethod
    def _shot_index(story: Story, index, name: str = "shot") -> int:
        S = len(story.shots)
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < S:
            raise StoryError(name, f"must be a shot index in [0, {S - 1}], got {index!r}")
        return index

    # ---- render -------------------------------------------------------------------------------

    def render(self, story: Story, *, regenerate: int | None = None, out_dir: str | Path | None = None,
               on_event=None, stop: threading.Event | None = None, both_sides: bool | None = None,
               take: str | None = None) -> RenderResult:
        """Render `story`; see the module docstring for what is sampled. Emits events through
        `on_event`; raises RenderStopped (after emitting Stopped) when `stop` is set: every take
        finished before that stays in the cache. both_sides (with regenerate): the regenerated
        shot also sees the shots after it, which keep their takes and are not stale; None = do it
        whenever it can (see `both_sides`), True = do it or raise StoryError saying why not.
        take (with regenerate): use that cached take for the shot instead (see `make_current`)."""
        self.check(story)
        emit = on_event or (lambda event: None)
        with self._lock:
            try:
                return self._render(story, regenerate, out_dir, emit, stop, both_sides, take)
            except RenderStopped as err:
                emit(Stopped(str(err), err.finished_shots))
                raise
            except (MemoryError, RuntimeError) as err:  # torch.OutOfMemoryError is a RuntimeError
                if not is_out_of_memory(err):
                    raise
                self._kept_kv = None
                free_memory()
                raise ResourceError(out_of_memory_message(story, self.model.device)) from err
            except OSError as err:
                if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                raise ResourceError(f"The disk is full (writing {err.filename or 'the shot cache'}): free some "
                                    "space or choose a --cache-dir with room; every shot finished so far is "
                                    "kept in the cache") from err

    def _render(self, story, regenerate, out_dir, emit, stop, both_sides=None, take=None) -> RenderResult:
        started = time.perf_counter()
        # with several ranks, rank 0's cache decides (cache hits, random seeds) and the others
        # follow; rank 0 also does every file write inside `decide`, so the others write nothing
        # and a write that fails there (a full disk) is raised on every rank at the same point
        decide = self.parallel.on_rank0 if self.parallel is not None else (lambda answer: answer())
        both, why_not = decide(lambda: self.both_sides(story, regenerate, both_sides))
        plans, runs = decide(lambda: self.plan(story, regenerate, both, take if regenerate is not None else None))
        out_dir = decide(lambda: self._open_outputs(out_dir, plans))
        fps = story.settings.fps
        results: dict[int, ShotResult] = {}
        takes: dict[int, Take] = {}
        seconds: dict[int, float] = {}
        # 1. cached and stale shots first (they are final already)
        for p in plans:
            if p.status == "generate":
                continue
            take = decide(lambda: self.cache.get(p.key))
            if take is None:  # evicted by another process between planning and now
                raise RuntimeError(f"take {p.key} of shot {p.index + 1} left the cache during the render; "
                                   "render again (it will be sampled)")
            takes[p.index] = take
            results[p.index] = decide(lambda: self._keep(p, take, regenerate, out_dir, fps))
            emit(ShotDone(p.index, results[p.index]))
        # 2. sampling runs, in story order; earlier shots become context as needed

        def on_step(info: StepInfo) -> None:
            run_index = runs.index(info.run)
            live = info.run.shots
            label = f"shot {live[0] + 1}" if len(live) == 1 else f"shots {live[0] + 1}-{live[-1] + 1}"
            emit(Progress(shot=live[0] if len(live) == 1 else None, step=info.step, total=info.total,
                          message=f"{label} of {len(plans)} · step {info.step}/{info.total}",
                          run=run_index, runs=len(runs), shots=live, density=info.density))
            if self.options.preview:
                frames = self.model.codec.preview(info.x0).numpy()
                emit(Preview(shot=live[0] if len(live) == 1 else None, frames=frames, step=info.step, shots=live))

        # a kept context cache serves a render that reads context, on one process; a render that
        # samples without context gives its memory back first (one that samples nothing keeps it)
        kept, self._kept_kv = self._kept_kv, None
        reads = both or any(run.start > 0 for run in runs)
        if kept is not None and (not (self.options.keep_context and self.parallel is None) or (runs and not reads)):
            kept = None
            free_memory()
        sampler = StorySampler(self.model, story, stop=stop, on_step=on_step, options=self.options,
                               parallel=self.parallel, kv=kept)
        del kept  # the sampler owns it now (and frees it first if this story needs another shape)
        encoded = 0
        previous = self._common(story)  # the key of the last context pass read (context_pass_key)
        try:
            for r, run in enumerate(runs):
                after = both and run.start == regenerate
                # the context passes before this run's sampling (forwards over the cached shots,
                # several consecutive ones per pass where routing is causal and memory allows:
                # StorySampler.context_groups) are announced as they go: on a GPU the passes of a
                # both-sided regeneration take seconds
                later = list(range(run.start + 1, len(plans))) if after else []
                groups = sampler.context_groups(list(range(encoded, run.start)))
                later_groups = sampler.context_groups(later) if later else []
                passes = len(groups) + len(later_groups)

                def read(group, i, previous, exclude=()) -> str:
                    key = context_pass_key(previous, [(takes[j].key, story.shots[j]) for j in group], exclude)
                    kept = sampler.holds_pass(group, key)
                    emit(reading_progress(run, r, len(runs), story.settings.steps, group, i, passes, kept))
                    sampler.encode_contexts(group, [takes[j].latents for j in group],
                                            [context_noise_seed(int(takes[j].meta["seed"])) for j in group],
                                            exclude, key)
                    return key
                for i, group in enumerate(groups):
                    previous = read(group, i, previous)
                if after:  # later shots as context: encoded without looking at the shot being replaced
                    sampler.hold_context(regenerate)
                    later = previous  # the later passes never see the regenerated shot: not in their keys
                    for i, group in enumerate(later_groups, len(groups)):
                        later = read(group, i, later, exclude=(regenerate,))
                encoded = run.start
                emit(Progress(shot=run.shots[0] if len(run.shots) == 1 else None, step=0,
                              total=story.settings.steps, message=f"run {r + 1}/{len(runs)}: starting",
                              run=r, runs=len(runs), shots=run.shots))
                latents, recorder, secs = sampler.sample(run, r, context_after=after)
                total_frames = sum(story.shots[s].frames for s in run.shots)
                for s in run.shots:
                    t0 = time.perf_counter()
                    with record_function(DECODE_RANGE):
                        frames = self.model.codec.decode(latents[s])
                    routing = recorder.shot_routing(s)
                    p = plans[s]
                    seconds[s] = secs * story.shots[s].frames / total_frames + time.perf_counter() - t0
                    take = Take(key=p.key, frames=frames, latents=latents[s], tensors=routing.tensors(),
                                meta=self._take_meta(story, p, routing, run, seconds[s], after and s == regenerate))
                    takes[s] = take
                    results[s] = decide(lambda: self._store(p, take, seconds[s], out_dir, fps))
                    emit(ShotDone(s, results[s]))
        except RenderStopped as err:
            self._keep_context(sampler)
            raise RenderStopped(str(err), tuple(sorted(results))) from None
        self._keep_context(sampler)
        # 3. the whole story, routing report and summary
        shots = [results[i] for i in range(len(plans))]
        routing = self._report(story, [takes[i] for i in range(len(plans))])

        def write_story() -> tuple[Path, dict]:  # rank 0: story.mp4, routing.json, summary.json
            cache_saved = sum(float(takes[i].meta.get("seconds", 0.0)) for i in range(len(plans))
                              if results[i].status != "generated")
            video, encoded_because = self._story_video(out_dir / "story.mp4", shots, takes, fps)
            summary = self._summary(story, shots, regenerate, time.perf_counter() - started, routing, video)
            summary["story_video_from"] = "frames" if encoded_because else "shots"  # encoded, or shot MP4s joined
            if encoded_because:
                summary["story_video_note"] = encoded_because
            summary["both_sides"] = both
            if regenerate is not None and not both:
                summary["both_sides_note"] = why_not
            summary["cache_saved_s"] = round(cache_saved, 3)  # what the cached takes cost when they were made
            summary["takes_gone"] = [p.index for p in plans if p.gone]  # remembered takes sampled anew
            # context passes: run, and served from the K/V cache the last render kept
            summary["context_passes"] = {"run": sampler.passes_run, "kept": sampler.passes_kept}
            atomic_write_text(out_dir / "routing.json", json_text(routing))
            atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
            return video, summary

        story_video, summary = decide(write_story)
        result = RenderResult(shots=shots, story_video=story_video, routing=routing, summary=summary)
        emit(Finished(result))
        return result

    def _keep_context(self, sampler: StorySampler) -> None:
        """Keep the render's context K/V cache for the next one (SamplerOptions.keep_context); a
        pass cut short left no record of itself (ContextKV.held), so a stopped render's cache is
        as good as a finished one's."""
        if self.options.keep_context and self.parallel is None:
            self._kept_kv = sampler.kv if sampler.kv is not None else sampler.kept_kv  # (nothing sampled: as it was)

    # ---- the current takes, read without rendering ----------------------------------------------

    def current_routing(self, story: Story) -> dict:
        """The routing report of the takes a render of `story` would serve from the cache now (the
        same report a render returns); a shot without a take has no rows and a None key."""
        self.check(story)
        plans, _ = self.plan(story)
        return self._report(story, [self.cache.read(p.key) if p.status != "generate" else None for p in plans])

    def take_pictures(self, key: str, latent_frames: list[int]) -> torch.Tensor | None:
        """(n, H, W, 3) uint8: for each latent frame of a cached take, the middle video frame it
        decodes to (the recall pictures); None if the take is absent. Reads those frames only and
        is not counted as a cache hit: looking at a take is not reusing it."""
        temporal = int(self.model.codec.temporal)
        return self.cache.read_frames(key, [middle_video_frame(k, temporal) for k in latent_frames])

    # ---- helpers ------------------------------------------------------------------------------

    def _report(self, story: Story, takes: list[Take | None]) -> dict:
        """The routing report of one take per shot (None: no take), plus the story's pins and
        blocks and the takes' keys (what the recall pictures read frames from)."""
        tr = self.model.transformer
        routing = build_report([s.frames for s in story.shots],
                               [None if t is None else self._routing_of(t) for t in takes],
                               tr.num_layers, tr.num_heads, recorded_steps(story.settings.steps))
        pins, blocks = story.links()
        routing["pins"], routing["blocks"] = [list(p) for p in pins], [list(b) for b in blocks]  # (query, key) shots
        routing["keys"] = [take.key if take is not None else None for take in takes]
        return routing

    def _take_meta(self, story: Story, p: _Planned, routing: ShotRouting, run: Run, seconds: float,
                   both_sides: bool) -> dict:
        shot = story.shots[p.index]
        return {"shot": p.index, "seed": p.seed, "seconds": seconds, "caption": shot.caption, "frames": shot.frames,
                "global_caption": story.global_caption, "model": self.model.identity,
                "mode": story.settings.mode, "generated_with": generated_with(run), "run_shots": list(run.shots),
                "created": time.time(), "routing": routing.meta(),
                "slot": p.slot, "both_sides": both_sides}  # the context it was made for (see _remembered)

    @staticmethod
    def _routing_of(take: Take) -> ShotRouting | None:
        if "routing" not in take.meta or "routing.frame_selection" not in take.tensors:
            return None
        return ShotRouting.from_stored(take.tensors, take.meta["routing"])

    # ---- the file work of a render: rank 0's alone (inside `decide`; see `writes`) ----------------

    def _open_outputs(self, out_dir, plans: list[_Planned]) -> Path:
        """Count the shots no take could serve; make the output folder (a new one under the cache
        folder's renders/ when none is given)."""
        self.cache.record_misses(sum(p.status == "generate" for p in plans))
        folder = Path(out_dir) if out_dir is not None else self._new_render_dir()
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _keep(self, p: _Planned, take: Take, regenerate: int | None, out_dir: Path, fps: int) -> ShotResult:
        """A cached or stale shot: its pointers where this render moves them, and its MP4."""
        if p.repoint or p.chosen:
            self.cache.point(p.slot, p.key)
        if p.chosen or p.index == regenerate:  # a reused take is a take of this shot too
            self.cache.point(p.loose, p.key)
            self.cache.remember(p.takes, p.key)
        return self._finish_shot(p, take, p.status, 0.0, out_dir, fps)

    def _store(self, p: _Planned, take: Take, seconds: float, out_dir: Path, fps: int) -> ShotResult:
        """A sampled take: into the shot cache (its slot, loose slot and history point at it), and its MP4."""
        self.cache.put(take)
        self.cache.point(p.slot, p.key)
        self.cache.point(p.loose, p.key)
        self.cache.remember(p.takes, p.key)
        return self._finish_shot(p, take, "generated", seconds, out_dir, fps)

    def _finish_shot(self, p: _Planned, take: Take, status: str, seconds: float, out_dir: Path,
                     fps: int) -> ShotResult:
        path = self._shot_video(take, out_dir / f"shot_{p.index:02d}.mp4", fps)
        routing = self._routing_of(take)
        return ShotResult(index=p.index, status=status, video_path=path, seconds=round(seconds, 3),
                          density=round(routing.mean_density, 4) if routing else 1.0,
                          seed=int(take.meta.get("seed", p.seed)), key=take.key, frames=int(take.frames.shape[0]),
                          generated_with=str(take.meta.get("generated_with", "")))

    def _shot_video(self, take: Take, path: Path, fps: int) -> Path:
        """A take's MP4 at `path`: a copy of the one the cache keeps at this fps, else encoded from
        its frames and then kept in the cache too (takes cached before the cache kept MP4s have none)."""
        copied = self._copy_cached_video(take.key, path, fps)
        if copied is not None:
            return copied
        write_mp4(path, take.frames, fps)
        self.cache.put_video(take.key, path, fps)
        return path

    def _copy_cached_video(self, key: str, path: Path, fps: int) -> Path | None:
        cached = self.cache.video(key, fps)
        if cached is None:
            return None
        try:
            return copy_mp4(cached, path)  # a copy: the cache's file is never handed out to be changed
        except FileNotFoundError:  # evicted by another process since `video` found it
            return None

    @staticmethod
    def _story_video(path: Path, shots: list[ShotResult], takes: dict[int, Take], fps: int) -> tuple[Path, str]:
        """story.mp4 and, if it had to be encoded from the frames, why. The shots' MP4s (all written
        by write_mp4 with one size and fps) are joined without encoding them again; where that fails
        (streams that differ, an unreadable part) the frames are encoded, so the story is always written."""
        try:
            return concat_mp4([s.video_path for s in shots], path), ""
        except Exception as err:  # any failure: encoding from the frames is the reference and always works
            because = f"the shot videos could not be joined ({type(err).__name__}: {err}); encoded from the frames"
        return write_mp4(path, torch.cat([takes[i].frames for i in range(len(shots))]), fps), because

    def _summary(self, story: Story, shots: list[ShotResult], regenerate, seconds: float, routing: dict,
                 story_video: Path) -> dict:
        c = self.cache.stats()
        return {
            "model": self.model_name, "model_identity": self.model.identity, "trained": self.model.trained,
            "device": str(self.model.device), "mode": story.settings.mode, "regenerate": regenerate,
            "moc": story.settings.moc.enabled, "seconds": round(seconds, 3),
            "shots": [{"index": s.index, "status": s.status, "cache_hit": s.status != "generated",
                       "seconds": s.seconds, "density": s.density, "seed": s.seed, "key": s.key,
                       "frames": s.frames, "video": s.video_path.name if s.video_path else None} for s in shots],
            "story_video": story_video.name, "sparsity": routing["sparsity"],
            "attn_flops_moc": routing["attn_flops_moc"], "attn_flops_dense": routing["attn_flops_dense"],
            "time_saved_estimate_s": routing["time_saved_estimate_s"],
            "cache": {"hits": c.hits, "misses": c.misses, "entries": c.entries, "bytes": c.bytes},
        }

    def _new_render_dir(self) -> Path:
        root = self.cache_dir / "renders"
        root.mkdir(parents=True, exist_ok=True)
        old = sorted(p for p in root.iterdir() if p.is_dir())
        for p in old[:max(0, len(old) - KEEP_RENDERS + 1)]:
            shutil.rmtree(p, ignore_errors=True)
        return root / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"


class ResourceError(RuntimeError):
    """The machine ran out of something (GPU or CPU memory, disk); the message names what to change.
    The engine stays usable: the next render starts afresh, and finished takes stay cached."""


def is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def out_of_memory_message(story: Story, device) -> str:
    """One line naming the settings that lower peak memory, with their current values."""
    s = story.settings
    longest = max(range(len(story.shots)), key=lambda i: story.shots[i].frames)
    tips = [f"settings.height x settings.width (now {s.height}x{s.width})",
            f"shot frames (longest: shots[{longest}].frames = {story.shots[longest].frames})"]
    if s.mode == "joint" and len(story.shots) > 1:
        tips.append("settings.mode = shot_by_shot (now joint: every shot is denoised at once)")
    if not s.moc.enabled:
        tips.append("settings.moc.enabled = true (dense attention holds every pair)")
    if s.guidance > 1:
        tips.append(f"settings.guidance = 1 (now {s.guidance:g}: two forwards per step)")
    where = "GPU" if torch.device(device).type == "cuda" else "CPU"
    return f"Out of {where} memory: lower " + "; or ".join(tips) + ". Finished shots stay cached."


__all__ = ["StoryEngine", "TakeInfo", "DEFAULT_CACHE_DIR", "KEY_VERSION", "MAX_HISTORY", "ResourceError"]
