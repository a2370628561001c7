"""Where a whole-model forward leaves the GPU idle: host synchronisations and launch gaps.

benchmarks/e2e.py's profiler split of the Wan2.1-1.3B-architecture forward at MoC-180k added its
kernels up to far less than the wall time (MoC "auto": 3.3 s of 5.1 s; dense cuDNN: 11.5 of 12.5
s): host stalls, or kernels the split missed? (Missed kernels: the first run of this script, see
BENCHMARKS.md.) Per variant it measures:

- the wall time of one forward (CUDA events) against the time the GPU was busy (the union of the
  profiler's kernel and copy intervals), and the idle time between them;
- the longest idle gaps, each with the kernels either side and the host operations running when
  the GPU went idle (what the host was waiting on or doing instead of launching);
- every call site that synchronised the host with the GPU (torch.cuda.set_sync_debug_mode), as
  the innermost project frames of its stack, counted.

    python benchmarks/forward_gaps.py --shots 8 --json OUT/forward_gaps.json   (GPU)
    python benchmarks/forward_gaps.py --tiny --device cpu                      (a CPU check)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.e2e import _sync, busy_ms, dense_backend  # noqa: E402
from benchmarks.train_step import is_range  # noqa: E402
from benchmarks.wan_forward import WAN_1_3B, forward, story_inputs  # noqa: E402
from engine.moc import MoCConfig  # noqa: E402

VARIANTS = {  # name: (MoC or dense, backend, dense SDPA kernel first)
    "moc-auto": (True, "auto", None), "moc-gather": (True, "gather", None), "moc-triton": (True, "triton", None),
    "dense-cudnn": (False, "auto", "cudnn"), "dense-flash": (False, "auto", "flash"),
    # the whole forward with self-attention's core skipped (its output is v): everything else the
    # forward costs, timed by the wall clock, so that wall - this is what self-attention costs in the
    # model, whatever the profiler records (the H200 trace of 2026-11-29 had ~14 ms gaps where the
    # feed-forward GEMMs run, in the dense forward too: kernels it did not see)
    "no-self-attention": (False, "auto", "cudnn")}
GEMM_NAMES = ("gemm", "nvjet", "cutlass", "cublas", "sm90_xmma")  # matrix-multiply kernel names, lower case


class skip_self_attention:
    """Inside, every MoCSelfAttention returns v in place of attention (projections, norms, RoPE and
    the output projection still run)."""

    def __enter__(self):
        from engine.processors import MoCSelfAttention
        self.saved = MoCSelfAttention._attend
        MoCSelfAttention._attend = lambda self, q, k, q_rope, k_rope, v: v
        return self

    def __exit__(self, *exc):
        from engine.processors import MoCSelfAttention
        MoCSelfAttention._attend = self.saved


def project_frames(stack, keep: int = 3) -> str:
    """The innermost `keep` frames of a stack that are this project's code, as file:line function."""
    ours = [f for f in stack if str(ROOT) in f.filename and "forward_gaps" not in f.filename]
    return " <- ".join(f"{Path(f.filename).relative_to(ROOT)}:{f.lineno} {f.name}" for f in reversed(ours[-keep:]))


class sync_sites:
    """Counts the call sites of synchronising CUDA calls inside (set_sync_debug_mode "warn")."""

    def __enter__(self):
        self.counts: collections.Counter = collections.Counter()
        self.saved = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" in str(message):
                self.counts[project_frames(traceback.extract_stack()[:-1]) or "(outside the project)"] += 1
            else:
                self.saved(message, category, filename, lineno, file, line)
        warnings.showwarning = show
        warnings.simplefilter("always")
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("warn")
        return self.counts

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = self.saved
        warnings.resetwarnings()


def gaps(events, cuda: bool, top: int) -> dict:
    """Busy time (the union of device intervals), idle time and the longest idle gaps of a trace."""
    from torch.autograd import DeviceType
    # kernels and copies only: a named range (record_function) also has a device-side span, from its
    # first kernel to its last, which would hide the idle gaps inside it (the first GPU run counted them)
    device = [e for e in events if (e.device_type == DeviceType.CUDA) == cuda and not is_range(e.name)
              and e.time_range.end > e.time_range.start]
    host = [e for e in events if e.device_type == DeviceType.CPU]
    device.sort(key=lambda e: e.time_range.start)
    if not device:
        return {"busy_ms": 0.0, "idle_ms": 0.0, "gaps": []}
    found, end, last = [], device[0].time_range.start, device[0]
    span0 = device[0].time_range.start
    for e in device:  # the idle stretches between the union's intervals
        s, t = e.time_range.start, e.time_range.end
        if s > end:
            found.append((s - end, end, last.name, e.name))
        if t > end:
            end, last = t, e
    out = []
    for length, start, before, after in sorted(found, reverse=True)[:top]:
        running = [h for h in host if h.time_range.start <= start <= h.time_range.end]
        running.sort(key=lambda h: h.time_range.end - h.time_range.start)  # innermost first
        out.append({"ms": round(length / 1e3, 3), "after_kernel": before[:70], "before_kernel": after[:70],
                    "host_ops": [h.name[:60] for h in running[:4]]})
    total_idle = sum(g[0] for g in found)
    small = sum(g[0] for g in found if g[0] < 50)  # gaps under 50 us: launch spacing
    gemm = [e for e in device if any(g in e.name.lower() for g in GEMM_NAMES)]
    return {"span_ms": round((end - span0) / 1e3, 1), "busy_ms": round(busy_ms(device), 1),
            "kernels": len(device), "gemm_kernels": len(gemm),
            "gemm_busy_ms": round(busy_ms(gemm), 1) if gemm else 0.0,
            "idle_ms": round(total_idle / 1e3, 1), "idle_in_gaps_under_50us_ms": round(small / 1e3, 1),
            "gaps_over_1ms": sum(1 for g in found if g[0] >= 1000), "gaps": out}


def measure(st, inputs, name: str, device, top: int, tiny: bool = False, warmups: int = 1) -> dict:
    """One variant: wall time of a warm forward, its GPU trace's gaps, its synchronisation sites.
    tiny: the CPU check, where MoC runs on the reference backend."""
    from torch.profiler import ProfilerActivity, profile
    is_moc, backend, dense = VARIANTS[name]
    moc = MoCConfig(top_k=5) if is_moc else None
    backend = "reference" if tiny and is_moc else backend
    cuda = device.type == "cuda"

    def run():
        forward(st, *inputs, moc, backend)
        _sync(device)
    skip = skip_self_attention() if name == "no-self-attention" else contextlib.nullcontext()
    with dense_backend(dense or "cudnn"), skip:  # MoC makes no dense call at these sizes
        for _ in range(warmups):  # autotuning, cuDNN plans, allocator (and compiling, twice with --compile)
            run()
        t0 = time.perf_counter()
        run()
        wall = (time.perf_counter() - t0) * 1e3
        before = torch.cuda.memory_stats(device) if cuda else {}
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            run()
        after = torch.cuda.memory_stats(device) if cuda else {}
        trace = gaps(prof.events(), cuda, top)
        # cudaMalloc / cudaFree by the caching allocator in the warm forward (a cudaFree waits for the GPU)
        trace["allocator"] = {k: after.get(k, 0) - before.get(k, 0)
                              for k in ("num_device_alloc", "num_device_free", "num_alloc_retries")}
        with sync_sites() as counts:
            run()
    return {"variant": name, "wall_ms": round(wall, 1), **trace,
            "sync_sites": [{"site": s, "calls": n} for s, n in counts.most_common(12)]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shots", type=int, default=8)
    p.add_argument("--frames", type=int, default=15, help="latent frames a shot")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--variants", default="moc-auto,dense-cudnn", help=f"comma-separated, of {sorted(VARIANTS)}")
    p.add_argument("--top", type=int, default=8, help="gaps listed per variant")
    p.add_argument("--tiny", action="store_true", help="a tiny model and story (a CPU check of this script)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--compile", action="store_true",
                   help="compile the blocks first (StoryTransformer.compile_blocks: the norms, modulation, "
                        "projections and feed-forward fused; attention stays eager)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"--variants takes {sorted(VARIANTS)}; got {sorted(unknown)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/forward_gaps.py needs a CUDA GPU (or --tiny --device cpu for a check)")
    from diffusers import WanTransformer3DModel
    from engine.backbone import StoryTransformer
    torch.manual_seed(0)
    config = dict(WAN_1_3B, num_layers=args.layers)
    h, w = 60, 100  # MoC-180k: 480 x 800 pixels, 30 x 50 tokens a frame
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.tiny:
        config.update(num_attention_heads=2, attention_head_dim=64, ffn_dim=64, text_dim=32, num_layers=2)
        h, w = 8, 12
    with torch.device(device):
        model = WanTransformer3DModel(**config).to(dtype).eval()
    st = StoryTransformer(model)
    if args.compile:
        st.compile_blocks()
    inputs = story_inputs(st, args.shots, args.frames, h, w, device, dtype)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "story": {"shots": args.shots, "frames": args.frames, "tokens": inputs[0].num_tokens,
                        "layers": config["num_layers"]}, "compiled": args.compile, "rows": []}
    print(f"{'variant':<12} {'wall ms':>9} {'busy ms':>9} {'idle ms':>9} {'gaps>1ms':>8}  top sync site")
    for name in names:
        row = measure(st, inputs, name, device, args.top, args.tiny, warmups=2 if args.compile else 1)
        result["rows"].append(row)
        site = row["sync_sites"][0] if row["sync_sites"] else {"site": "-", "calls": 0}
        print(f"{name:<12} {row['wall_ms']:>9.1f} {row['busy_ms']:>9.1f} {row['idle_ms']:>9.1f} "
              f"{row['gaps_over_1ms']:>8}  {site['calls']}x {site['site'][:90]}")
        for g in row["gaps"][:4]:
            print(f"    gap {g['ms']:.2f} ms after {g['after_kernel'][:40]} | host: {', '.join(g['host_ops'][:3])}")
        print(f"    {row['kernels']} kernels recorded, {row['gemm_kernels']} of them matrix multiplies "
              f"({row['gemm_busy_ms']:.1f} ms busy)")
        base = next((r["wall_ms"] for r in result["rows"] if r["variant"] == "no-self-attention"), None)
        if base is not None:  # what self-attention costs inside the model, by the wall clock
            result["self_attention_ms"] = {r["variant"]: round(r["wall_ms"] - base, 1) for r in result["rows"]
                                           if r["variant"] != "no-self-attention"}
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1) + "\n")
    if result.get("self_attention_ms"):
        layers = config["num_layers"]
        print(f"self-attention inside the forward (wall - no-self-attention's {base:.1f} ms): " + ", ".join(
            f"{k} {v:.1f} ms ({v / layers:.2f} ms a layer)" for k, v in result["self_attention_ms"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
