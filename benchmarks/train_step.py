"""Training step time of the default model: MoC (fused Triton kernels) against dense attention.

One optimiser step of `engine.training.training_loss` (forward + backward + AdamW, bf16 autocast)
on the default transformer config, at the batch shapes the trainer uses (stories of S shots x F
frames, as many stories as fit the token budget). Latents and caption states are random: the
step's cost does not depend on their values, and no codec or text encoder is needed. Also
counts host synchronisations per step (torch.cuda.set_sync_debug_mode) and the Python lines they
come from, the usual reason a small model's step is launch-bound.

Run (GPU):  python benchmarks/train_step.py [--json benchmarks/results/train_step_h200.json]
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.default_model import DEFAULT_TRANSFORMER, DEFAULT_VAE, HEIGHT, WIDTH  # noqa: E402
from engine.moc import MoCConfig  # noqa: E402
from engine.training import StoryBatch, TrainingConfig, training_loss  # noqa: E402

SHAPES = [(2, 8, 49152), (4, 8, 49152), (8, 8, 49152), (8, 8, 98304)]  # (shots, frames, tokens per step)


# the frame codec's latent grid (each DownEncoderBlock2D but the last halves a side) and the
# transformer's tokens per frame: 128 x 192 frames -> 32 x 48 cells -> 8 x 12 = 96 tokens
DOWN = 2 ** (len(DEFAULT_VAE["down_block_types"]) - 1)
LATENT_H, LATENT_W = HEIGHT // DOWN, WIDTH // DOWN
FRAME_TOKENS = (LATENT_H // DEFAULT_TRANSFORMER["patch_size"][1]) * (LATENT_W // DEFAULT_TRANSFORMER["patch_size"][2])


def make_batch(shots: int, frames: int, tokens: int, device) -> StoryBatch:
    per_story = shots * frames * FRAME_TOKENS
    B = max(1, tokens // per_story)
    latents = torch.randn(B, DEFAULT_VAE["latent_channels"], shots * frames, LATENT_H, LATENT_W, device=device)
    text = [[torch.randn(12, 384) for _ in range(shots + 1)] for _ in range(B)]
    return StoryBatch(latents, (frames,) * shots, text)


def train_step(tr, opt, batch, config, i: int) -> None:
    g = torch.Generator(device=batch.latents.device).manual_seed(i)
    with torch.autocast(batch.latents.device.type, dtype=torch.bfloat16):
        loss = training_loss(tr, batch, config, generator=g)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_ms(tr, opt, batch, config, repeats: int) -> float:
    dev = batch.latents.device
    for i in range(3):
        train_step(tr, opt, batch, config, i)
    _sync(dev)
    t0 = time.perf_counter()
    for i in range(repeats):
        train_step(tr, opt, batch, config, i)
    _sync(dev)
    return (time.perf_counter() - t0) / repeats * 1e3


def profile_step(tr, opt, batch, config, steps: int = 3, top: int = 20) -> dict:
    """Where a step's device time goes (torch.profiler): the busiest kernels (ms and launches per
    step), the device's busy time against the wall time (busy << wall: launch- or host-bound) and
    the launches per step. On a CPU the "device" is the CPU's own ops (a check of this code)."""
    from torch.profiler import ProfilerActivity, profile
    dev = batch.latents.device
    for i in range(3):
        train_step(tr, opt, batch, config, i)
    _sync(dev)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for i in range(steps):
            train_step(tr, opt, batch, config, i)
        _sync(dev)
    wall = (time.perf_counter() - t0) / steps * 1e3

    def device_us(e) -> float:
        if dev.type == "cuda":
            return float(getattr(e, "self_device_time_total", 0.0) or getattr(e, "self_cuda_time_total", 0.0))
        return float(e.self_cpu_time_total)

    events = [e for e in prof.key_averages() if device_us(e) > 0]
    if dev.type == "cuda":  # kernels and copies: the events that ran on the device
        events = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")] or events
    # named ranges (the engine's routing and attention, the optimizer's step) span kernels that are
    # also listed on their own: reported apart, never summed into the busy time
    ranges = [e for e in events if is_range(e.key)]
    events = [e for e in events if not is_range(e.key)]
    events.sort(key=device_us, reverse=True)
    return {"wall_ms_per_step": round(wall, 2),  # under the profiler, so above step_ms
            "device_busy_ms_per_step": round(sum(map(device_us, events)) / steps / 1e3, 2),
            "launches_per_step": sum(e.count for e in events) / steps,
            "ranges_ms_per_step": {e.key: round(device_us(e) / steps / 1e3, 3) for e in ranges},
            "top": [{"name": e.key[:90], "ms_per_step": round(device_us(e) / steps / 1e3, 3),
                     "calls_per_step": e.count / steps} for e in events[:top]]}


def is_range(name: str) -> bool:
    """A profiler range (record_function) rather than a kernel: the engine's own, or torch's
    (Optimizer.step#AdamW.step, ProfilerStep#3)."""
    from engine.moc import ATTENTION_RANGE, ROUTING_RANGE
    return name in (ATTENTION_RANGE, ROUTING_RANGE) or "#" in name


def walked_work(tile: int, training: bool, shots: int = 8, frames: int = 8, seed: int = 0) -> dict:
    """What the fused kernels walk for one training-shaped selection (CPU, no kernels): per tile of
    `tile` query rows, in the kernels' row order, the keys of every chunk any of its rows attends,
    as a fraction of dense pairs, against the attended pairs (the density). Queries and keys are
    random with a per-frame component shared by q and k, so routing has structure to find."""
    from engine.moc import TokenLayout, route
    from engine.moc.triton_attention import ordered_tiles
    g = torch.Generator().manual_seed(seed)
    layout = TokenLayout(frame_tokens=FRAME_TOKENS, shot_frames=(frames,) * shots)
    N, B, H, D = layout.num_tokens, 2, DEFAULT_TRANSFORMER["num_attention_heads"], DEFAULT_TRANSFORMER["attention_head_dim"]
    frame = torch.arange(N) // FRAME_TOKENS
    base = torch.randn(shots * frames, D, generator=g)[frame]
    q = 0.5 * torch.randn(B, H, N, D, generator=g) + base
    k = 0.5 * torch.randn(B, H, N, D, generator=g) + base
    sel = route(q, k, layout, MoCConfig(tile=tile), training=training, generator=g, impl="reference")
    tiles = ordered_tiles(sel)[1]  # what the kernels walk: the tile unions in their row order
    clen = layout.tensors.chunk_len.double()
    ids = tiles.tile_chunks.long()
    keys = torch.where(ids >= 0, clen[ids.clamp(min=0)], 0.0).sum(-1)  # (B, H, T) keys walked per tile
    rows = torch.full(keys.shape[-1:], float(tile), dtype=torch.float64)
    rows[-1] = N - (len(rows) - 1) * tile
    walked = float((keys * rows).sum()) / (B * H * N * N)
    return {"tile": tile, "training": training, "density": round(sel.density(), 4), "walked": round(walked, 4),
            "walked_over_density": round(walked / sel.density(), 3)}


def best_moc(rows: list[dict]) -> dict:
    """The MoC training setup with the least step time summed over the timed shapes: backend
    "triton" at some tile (the default's 128 when no other was timed), or backend "gather"; eager,
    or with the blocks compiled (--compile's `*_compiled_ms` rows)."""
    default = MoCConfig().tile
    total: dict[tuple[str, int, bool], float] = {}
    counts: dict[tuple[str, int, bool], int] = {}
    for r in rows:
        for key, ms in r.items():
            if not key.endswith("_ms"):
                continue
            name = key[:-len("_ms")]
            compiled = name.endswith("_compiled")
            name = name[:-len("_compiled")] if compiled else name
            if name == "moc":
                setup = ("triton", default, compiled)
            elif name.startswith("moc_tile") and name[len("moc_tile"):].isdigit():
                setup = ("triton", int(name[len("moc_tile"):]), compiled)
            elif name == "moc_gather":
                setup = ("gather", default, compiled)
            else:
                continue
            total[setup] = total.get(setup, 0.0) + ms
            counts[setup] = counts.get(setup, 0) + 1
    # only setups timed on every shape compete (one that failed on a shape has a partial sum)
    backend, tile, compiled = min((k for k in total if counts[k] == len(rows)), key=total.get)
    return {"backend": backend, "tile": tile, "compiled": compiled}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--tiles", default="",
                   help="also time MoC with these kernel tiles (query rows per tile, comma-separated, e.g. 64,32): "
                        "the same attention, a smaller union of routed chunks to walk per tile")
    p.add_argument("--gather", action="store_true",
                   help="also time MoC on backend 'gather' (per key chunk: work that follows the routed pairs)")
    p.add_argument("--compile", action="store_true",
                   help="also time the step with the blocks compiled (StoryTransformer.compile_blocks; "
                        "MoC on 64-row tiles, as the trainer runs it) and report the first call's compile time")
    p.add_argument("--profile", action="store_true",
                   help="also profile one step of each (torch.profiler): busiest kernels, busy vs wall time")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "train_step_h200.json")
    p.add_argument("--walk", action="store_true",
                   help="CPU, no timing: the work the kernels walk per tile size, inference and training "
                        "routing (8 shots x 8 frames), to benchmarks/results/train_walk_cpu.json")
    args = p.parse_args(argv)
    if args.walk:
        rows = [walked_work(t, tr) for t in (128, 64, 32, 16) for tr in (False, True)]
        print(f"{'tile':>4} {'routing':>9} {'density':>8} {'walked':>7} {'walked/density':>14}")
        for r in rows:
            print(f"{r['tile']:>4} {'training' if r['training'] else 'sampling':>9} {r['density']:>8.3f} "
                  f"{r['walked']:>7.3f} {r['walked_over_density']:>14.2f}")
        out = ROOT / "benchmarks" / "results" / "train_walk_cpu.json"
        out.write_text(json.dumps({"shots": 8, "frames": 8, "frame_tokens": FRAME_TOKENS, "rows": rows}, indent=1) + "\n")
        return 0
    from diffusers import WanTransformer3DModel
    from engine.backbone import StoryTransformer
    dev = torch.device("cuda")
    torch.manual_seed(0)
    tr = StoryTransformer(WanTransformer3DModel(**DEFAULT_TRANSFORMER).to(dev).train())
    opt = torch.optim.AdamW(tr.model.parameters(), lr=1e-5)
    compiled = None
    if args.compile:
        import copy
        compiled = StoryTransformer(copy.deepcopy(tr.model))
        compiled.compile_blocks()
        compiled_opt = torch.optim.AdamW(compiled.model.parameters(), lr=1e-5)
    rows = []
    for shots, frames, tokens in SHAPES:
        batch = make_batch(shots, frames, tokens, dev)
        row = {"shots": shots, "frames": frames, "stories": batch.latents.shape[0],
               "tokens": batch.latents.shape[0] * shots * frames * FRAME_TOKENS}
        for name, cfg in (("dense", TrainingConfig(moc=None)), ("moc", TrainingConfig(moc=MoCConfig(), backend="triton"))):
            row[f"{name}_ms"] = round(step_ms(tr, opt, batch, cfg, args.repeats), 2)
            torch.cuda.set_sync_debug_mode("warn")
            import warnings
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                step_ms(tr, opt, batch, cfg, 1)
            torch.cuda.set_sync_debug_mode(0)
            syncs = [w for w in caught if "synchroniz" in str(w.message)]
            row[f"{name}_syncs_per_step"] = len(syncs) / 4  # 3 warm-up + 1
            # where they happen (the Python line each warning points at), most frequent first
            sites = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
            row[f"{name}_sync_sites"] = {site: n / 4 for site, n in sites.most_common(12)}
        row["moc_over_dense"] = round(row["moc_ms"] / row["dense_ms"], 3)
        if args.gather:
            cfg = TrainingConfig(moc=MoCConfig(), backend="gather")
            try:
                row["moc_gather_ms"] = ms = round(step_ms(tr, opt, batch, cfg, args.repeats), 2)
                print(f"{shots} shots x {frames} frames: MoC on backend 'gather' {ms:.1f} ms ({ms / row['dense_ms']:.2f}x dense)")
            except Exception as e:  # a new backend's first GPU run: record why, keep timing the rest
                row["moc_gather_error"] = f"{type(e).__name__}: {e}"[:500]
                print(f"backend 'gather' failed: {row['moc_gather_error']}")
        for tile in (int(t) for t in args.tiles.split(",") if t.strip()):
            cfg = TrainingConfig(moc=MoCConfig(tile=tile), backend="triton")
            row[f"moc_tile{tile}_ms"] = ms = round(step_ms(tr, opt, batch, cfg, args.repeats), 2)
            print(f"{shots} shots x {frames} frames: MoC with {tile}-row tiles {ms:.1f} ms "
                  f"({ms / row['dense_ms']:.2f}x dense; {MoCConfig().tile}-row tiles {row['moc_ms']:.1f} ms)")
        if compiled is not None:
            for name, cfg in (("dense", TrainingConfig(moc=None)),
                              ("moc_tile64", TrainingConfig(moc=MoCConfig(tile=64), backend="triton"))):
                started = time.perf_counter()
                step_ms(compiled, compiled_opt, batch, cfg, 1)  # compiles (or recompiles) for this shape, then 3 more steps
                row[f"{name}_compiled_warmup_s"] = round(time.perf_counter() - started, 1)
                row[f"{name}_compiled_ms"] = ms = round(step_ms(compiled, compiled_opt, batch, cfg, args.repeats), 2)
                eager = row.get(f"{name}_ms")  # dense_ms, moc_tile64_ms (with --tiles 64)
                print(f"{shots} shots x {frames} frames: {name} compiled {ms:.1f} ms"
                      + (f" (eager {eager:.1f} ms)" if eager else "") + f", its first 4 steps (compiling) {row[f'{name}_compiled_warmup_s']} s")
        if args.profile and (shots, frames, tokens) == SHAPES[2]:
            for name, cfg in (("dense", TrainingConfig(moc=None)), ("moc", TrainingConfig(moc=MoCConfig(), backend="triton"))):
                row[f"{name}_profile"] = prof = profile_step(tr, opt, batch, cfg)
                print(f"{name}, {shots} shots x {frames} frames: wall {prof['wall_ms_per_step']:.1f} ms, device busy "
                      f"{prof['device_busy_ms_per_step']:.1f} ms, {prof['launches_per_step']:.0f} launches a step; ranges: "
                      + ", ".join(f"{k} {v:.1f} ms" for k, v in prof["ranges_ms_per_step"].items()))
                for k in prof["top"][:12]:
                    print(f"  {k['ms_per_step']:8.2f} ms  x{k['calls_per_step']:<5g} {k['name']}")
        rows.append(row)
        write_json(args.json, rows)  # after every shape: a run cut short by its time limit keeps what it timed
    print(f"{'shots':>5} {'frames':>6} {'stories':>7} {'tokens':>7} {'dense ms':>9} {'MoC ms':>8} {'MoC/dense':>9} "
          f"{'syncs dense':>11} {'syncs MoC':>9}")
    for r in rows:
        print(f"{r['shots']:>5} {r['frames']:>6} {r['stories']:>7} {r['tokens']:>7} {r['dense_ms']:>9.1f} "
              f"{r['moc_ms']:>8.1f} {r['moc_over_dense']:>9.2f} {r['dense_syncs_per_step']:>11.0f} {r['moc_syncs_per_step']:>9.0f}")
    for r in rows[:1]:
        print("host synchronisations per step, by Python line (first shape):")
        for name in ("dense", "moc"):
            print(f"  {name}: " + ", ".join(f"{site} x{n:g}" for site, n in r[f"{name}_sync_sites"].items()))
    best = write_json(args.json, rows)
    print(f"fastest MoC setup over all shapes: backend {best['backend']}, {best['tile']}-row tiles, "
          + ("blocks compiled" if best["compiled"] else "eager"))
    return 0


def write_json(path: Path, rows: list[dict]) -> dict:
    """The results so far, with the fastest MoC setup among the shapes timed; returns that setup."""
    best = best_moc(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                "config": DEFAULT_TRANSFORMER, "best": best, "shapes_timed": len(rows),
                                "rows": rows}, indent=2) + "\n")
    return best


if __name__ == "__main__":
    sys.exit(main())
