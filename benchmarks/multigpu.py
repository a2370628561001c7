"""Sequence-parallel MoC over several GPUs: one transformer forward on N GPUs against 1.

The Wan2.1-1.3B architecture (30 layers, 12 heads x 128; benchmarks/wan_forward.py) with random
bf16 weights, batch 1, per-shot timesteps, through the engine's forward (engine/backbone.py) with
MoC self-attention (backend "auto": the Triton tile or gather kernels, on each rank's heads).
Stories: MoC-180k (8 shots x 15 latent frames x 1,500 tokens = 180,000 tokens) and a 360k-token
story (16 such shots). For each: the forward on rank 0's GPU alone (the others wait on a CPU
barrier), then spread over all ranks (engine/parallel.py: tokens sharded, an all-to-all around
attention, the output all-gathered), median of --repeats after a warm-up; the parallel time is
the slowest rank's. Scaling efficiency = t(1 GPU) / (N x t(N GPUs)). Random weights route near
randomly (the gather kernel's case); benchmarks/attention.py has structured inputs.

Before timing, a small story checks that the N-GPU forward equals the 1-GPU forward (relative
error, recorded). Robust for one unattended run: every collective has a timeout (--timeout,
--wait-timeout), the JSON is rewritten after each row, and an out-of-memory error is recorded as
that row's result (on 1 GPU the run goes on; in the N-GPU forward it ends, torchrun stopping
every rank).

    torchrun --standalone --nproc-per-node 2 benchmarks/multigpu.py                       (GPUs)
    torchrun --standalone --nproc-per-node 2 benchmarks/multigpu.py --smoke               (CPU, gloo)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusers import WanTransformer3DModel  # noqa: E402

from benchmarks.wan_forward import WAN_1_3B, story_inputs  # noqa: E402
from engine.backbone import StoryTransformer  # noqa: E402
from engine.moc import MoCConfig  # noqa: E402
from engine.parallel import SequenceParallel, start  # noqa: E402
from engine.processors import ForwardPlan, SelfAttentionPlan  # noqa: E402

STORIES = {"moc-180k": dict(shots=8, frames=15, h=60, w=100),  # 1,500 tokens a frame (30 x 50 patches)
           "story-360k": dict(shots=16, frames=15, h=60, w=100)}
SMOKE_STORIES = {"smoke-a": dict(shots=3, frames=2, h=6, w=10), "smoke-b": dict(shots=4, frames=3, h=6, w=8)}
SMOKE_MODEL = dict(WAN_1_3B, num_attention_heads=4, attention_head_dim=16, text_dim=32, freq_dim=32, ffn_dim=64,
                   num_layers=2)
CHECK_STORY = dict(shots=3, frames=3, h=16, w=24)  # the equality check (GPU)
SMOKE_CHECK_STORY = dict(shots=3, frames=3, h=6, w=10)  # 135 tokens: the ranks' slices are padded


def run_forward(st, inputs, moc, parallel: SequenceParallel | None, backend: str = "auto"):
    layout, latents, timestep, text, cross, rotary = inputs
    plan = ForwardPlan(self_attn=SelfAttentionPlan(layout=layout, q_offset=0, moc=moc, backend=backend,
                                                   parallel=parallel), cross_attn=cross, rotary=rotary)
    with torch.no_grad():
        return st.forward(latents, timestep, text, plan)


def is_out_of_memory(err: BaseException) -> bool:
    """(Not engine.engine's: that imports the video writer, which the GPU image lacks.)"""
    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(err).lower()


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(fn, device, repeats: int, coordinate=None) -> float:
    """Median wall ms of fn() after one warm-up; `coordinate(ms)` (parallel runs) lines the ranks up
    before each run and returns the slowest rank's time."""
    times = []
    for i in range(repeats + 1):
        if coordinate is not None:
            coordinate(0.0)
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        ms = (time.perf_counter() - t0) * 1e3
        if coordinate is not None:
            ms = coordinate(ms)
        if i:  # the first run warms up (Triton compiles, cuDNN plans)
            times.append(ms)
    return sorted(times)[len(times) // 2]


def peak_gib(device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2) if device.type == "cuda" else None


def free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model and stories on the CPU (gloo): checks the script")
    parser.add_argument("--stories", nargs="+", help=f"which stories (default: all of {list(STORIES)})")
    parser.add_argument("--dense", action="store_true", help="also time dense attention (cuDNN SDPA)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=WAN_1_3B["num_layers"])
    parser.add_argument("--timeout", type=float, default=300,
                        help="seconds a collective of the parallel forward may wait before failing")
    parser.add_argument("--wait-timeout", type=float, default=1800,
                        help="seconds the other ranks may wait while rank 0 times the 1-GPU forwards")
    parser.add_argument("--json", type=Path, help="default: benchmarks/results/multigpu.json "
                                                  "(--smoke: multigpu_smoke.json in the temp folder)")
    args = parser.parse_args()
    sp, device_name = start("cpu" if args.smoke else "cuda", timeout_s=args.timeout)
    device = torch.device(device_name)
    # the ranks that wait while rank 0 times the 1-GPU forward wait on the CPU, with a timeout of their
    # own (a rank that fails ends the run: torchrun then stops the others)
    cpu_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=args.wait_timeout))
    rank0 = sp.rank == 0
    say = print if rank0 else (lambda *a, **k: None)
    stories = SMOKE_STORIES if args.smoke else STORIES
    chosen = args.stories or list(stories)
    unknown = [s for s in chosen if s not in stories]
    if unknown:
        raise SystemExit(f"--stories: unknown {unknown}; choose from {list(stories)}")
    json_path = args.json or (Path(tempfile.gettempdir()) / "multigpu_smoke.json" if args.smoke
                              else ROOT / "benchmarks" / "results" / "multigpu.json")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    config = dict(SMOKE_MODEL if args.smoke else WAN_1_3B, num_layers=2 if args.smoke else args.layers)

    # the same random weights on every rank (same seed; checked below)
    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(**config).to(dtype).eval()
    st = StoryTransformer(model)
    moc = MoCConfig(top_k=5)
    with torch.no_grad():
        checksum = float(sum(p.double().sum() for p in model.parameters()))
    sums = sp.all_gather_object(checksum)
    if len(set(sums)) != 1:
        raise SystemExit(f"the ranks built different weights (checksums {sums}); check that the seed is honoured")

    def coordinate(ms: float) -> float:
        out = sp.all_gather_object(ms)  # (the CPU-side gather also lines the ranks up)
        return max(out)

    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "world": sp.world, "backend": dist.get_backend(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "model": ("tiny smoke model" if args.smoke else "Wan2.1-1.3B architecture") + f", random weights, {dtype}",
            "layers": config["num_layers"], "heads": config["num_attention_heads"], "top_k": 5,
            "attention_backend": "auto", "repeats": args.repeats, "rows": []}

    def write() -> None:
        if rank0:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(meta, indent=1) + "\n")

    # 1. the N-GPU forward equals the 1-GPU forward on a small story: dense, and MoC on the backends
    # "auto" picks at scale (at this size "auto" would run dense SDPA)
    check = story_inputs(st, **(SMOKE_CHECK_STORY if args.smoke else CHECK_STORY), device=device, dtype=dtype, seed=1)
    kernels = ["chunked"] if args.smoke else ["triton", "gather"]
    for name, cfg, backend in [("dense", None, "auto")] + [(f"moc-{k}", moc, k) for k in kernels]:
        one = run_forward(st, check, cfg, None, backend).float()
        many = run_forward(st, check, cfg, sp, backend).float()
        rel = float((many - one).norm() / one.norm())
        meta[f"check_rel_err_{name}"] = rel
        say(f"check ({check[0].num_tokens} tokens, {name}): {sp.world} ranks vs 1, relative error {rel:.2e}")
    del check, one, many
    write()

    # 2. the timed rows, the JSON rewritten after each
    attentions = [("moc-auto", moc)] + ([("dense", None)] if args.dense else [])
    for story in chosen:
        free(device)
        inputs = story_inputs(st, **stories[story], device=device, dtype=dtype)
        tokens = inputs[0].num_tokens
        for attention, cfg in attentions:
            row = {"story": story, "tokens": tokens, "attention": attention}
            # 1 GPU: rank 0 alone; an out-of-memory error is the row's result
            if rank0:
                free(device)
                try:
                    row["ms_1"] = round(time_forward(lambda: run_forward(st, inputs, cfg, None), device, args.repeats), 1)
                    row["peak_gib_1"] = peak_gib(device)
                except (RuntimeError, MemoryError) as err:
                    if not is_out_of_memory(err):
                        raise
                    row["ms_1"], row["error_1"] = None, "out of memory"
                    free(device)
            dist.barrier(group=cpu_group)
            # N GPUs: every rank, in step; an out-of-memory error on any rank stops the row on all
            free(device)
            try:
                row[f"ms_{sp.world}"] = round(time_forward(lambda: run_forward(st, inputs, cfg, sp), device,
                                                           args.repeats, coordinate), 1)
                peaks = sp.all_gather_object(peak_gib(device))
                row[f"peak_gib_{sp.world}"] = None if peaks[0] is None else max(peaks)
            except (RuntimeError, MemoryError) as err:
                if not is_out_of_memory(err):
                    raise
                row[f"ms_{sp.world}"], row[f"error_{sp.world}"] = None, f"out of memory on rank {sp.rank}"
                free(device)
                raise SystemExit(f"rank {sp.rank}: out of memory in the {sp.world}-GPU forward of {story} "
                                 "(recorded); the other ranks stop at the collective timeout") from None
            finally:
                meta["rows"] = [r for r in meta["rows"] if (r["story"], r["attention"]) != (story, attention)] + [row]
                write()
            if row.get("ms_1"):
                row["speedup"] = round(row["ms_1"] / row[f"ms_{sp.world}"], 2)
                row["scaling_efficiency"] = round(row["ms_1"] / (sp.world * row[f"ms_{sp.world}"]), 3)
            write()
            say(row, flush=True)

    n = sp.world
    say(f"\n{'story':>12} {'tokens':>7} {'attention':>9} {'1 GPU ms':>10} {f'{n} GPUs ms':>11} {'speed-up':>9} "
        f"{'efficiency':>10}")
    for r in meta["rows"]:
        one = f"{r['ms_1']:.1f}" if r.get("ms_1") else r.get("error_1", "-")
        many = f"{r[f'ms_{n}']:.1f}" if r.get(f"ms_{n}") else r.get(f"error_{n}", "-")
        say(f"{r['story']:>12} {r['tokens']:>7} {r['attention']:>9} {one:>10} {many:>11} "
            f"{r.get('speedup', '-'):>9} {r.get('scaling_efficiency', '-'):>10}")
    say(f"wrote {json_path}")
    dist.barrier(group=cpu_group)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
