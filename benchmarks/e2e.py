"""End to end on the GPU: an 8-shot, 180k-token story through the engine, MoC against dense.

A Wan2.1-1.3B-architecture checkpoint is built offline and saved like a real one (save_pretrained,
safetensors): the transformer at full size (30 layers, 12 heads x 128) with random bf16 weights,
the Wan2.1 VAE architecture with random weights, and a one-layer random umT5 of the real width
(4096) with a word-level tokenizer of the story's words. The engine loads it through `--model`
like any checkpoint. Parts (--parts, all by default):

  forward   one transformer forward of the whole story (the engine's StoryTransformer): MoC on the
            fused Triton kernels (tile unions, and "gather": per key chunk) against dense cuDNN and
            dense FlashAttention-2; peak memory; the
            device time split into attention, routing and the rest (torch.profiler, by the
            engine's ranges moc.ROUTING_RANGE and moc.ATTENTION_RANGE).
  scaling   the forward at 1 to 8 shots (22.5k to 180k tokens), MoC against dense cuDNN.
  render    StoryEngine.render of the story (joint, then shot by shot) with MoC: H.264 for every
            shot and the story, the routing report, peak memory; with --render-dense also dense.
            Then regenerate one middle shot with the others as cached context (both sides),
            against rendering all 8; another take of it, the others' context K/V kept from the
            regeneration before (SamplerOptions.keep_context: no context pass runs); then, each
            reading its context afresh, with earlier shots only; with both sides again,
            consecutive cached shots read in one context pass each as memory allows
            (context_pass_tokens=0), and one pass per shot once more; each row with its seconds by
            phase and each context pass's seconds.

Every part runs with this process's GPU memory capped at what an 80 GB H100 offers (--memory-gib,
79 GiB), so the lent H200 shows whether the story fits an H100; a render that does not fit records
the engine's out-of-memory message instead of a time. Renders take the app's default steps (12).

Random weights give near-random routing: the attention figures of benchmarks/attention.py bound
what a trained model's routing gives. The JSON has the top-level keys forward_speedup_vs_cudnn,
forward_speedup_vs_flash and regenerate_speedup beside the detailed rows; `--plot JSON` draws the
scaling table as a PNG (here, where Pillow is; the GPU image may lack it).

    python benchmarks/e2e.py --json benchmarks/results/e2e_h100.json --log-dir OUT   (GPU)
    python benchmarks/e2e.py --plot benchmarks/results/e2e_h100.json --png docs/e2e_scaling.png
    python benchmarks/e2e.py --tiny --device cpu ...   (a CPU check of the script, tests)
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import datetime
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.train_step import is_range  # noqa: E402
from benchmarks.wan_forward import WAN_1_3B, forward, story_inputs  # noqa: E402
from engine.moc import ATTENTION_RANGE, ROUTING_RANGE, MoCConfig  # noqa: E402
import engine.moc.attention as moc_attention_module  # noqa: E402

# the MoC-180k story: 8 shots x 15 latent frames (57 video frames each) at 480 x 800 pixels
# (60 x 100 latent cells, 30 x 50 = 1,500 tokens a frame)
FULL = dict(shots=8, frames=15, height=480, width=800, layers=30)
TINY = dict(shots=3, frames=2, height=32, width=48, layers=2)  # the CPU check
CAPTIONS = ["a red fox runs across the snow", "the fox stops by a frozen lake", "a blue bird lands on a branch",
            "the bird watches the fox", "the fox looks up at the bird", "snow starts to fall on the lake",
            "the bird flies over the trees", "the fox walks home through the snow"]
GLOBAL = "a red fox and a blue bird in a snowy forest"


# ---- the checkpoint ---------------------------------------------------------------------------

def build_checkpoint(folder: Path, tiny: bool, layers: int, device=torch.device("cpu")) -> Path:
    """Save a random Wan2.1 text-to-video checkpoint (see the module docstring) to `folder`; the
    transformer's random init runs on `device` (a GPU draws 1.3B numbers in a blink)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    words = sorted({w for c in CAPTIONS + [GLOBAL] for w in c.split()}) + ["<unk>", "<pad>", "</s>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", len(words) - 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    width = 32 if tiny else WAN_1_3B["text_dim"]
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(words), d_model=width, d_kv=8 if tiny else 64, d_ff=64 if tiny else 512, num_layers=1,
        num_heads=4, relative_attention_num_buckets=8 if tiny else 32, pad_token_id=len(words) - 2,
        eos_token_id=len(words) - 1, decoder_start_token_id=len(words) - 2))
    if tiny:
        transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                            in_channels=16, out_channels=16, text_dim=width, freq_dim=16,
                                            ffn_dim=32, num_layers=layers, rope_max_seq_len=64)
        vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True])
    else:
        with torch.device(device):
            transformer = WanTransformer3DModel(**{**WAN_1_3B, "num_layers": layers})
        transformer = transformer.to(torch.bfloat16).cpu()
        vae = AutoencoderKLWan()  # the Wan2.1 VAE's architecture (its default config)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=transformer)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def make_story(size: dict, steps: int, mode: str, moc: bool, seed0: int = 100):
    from engine.story import GenerationSettings, MoCSettings, Shot, Story
    shots = [Shot(CAPTIONS[i % len(CAPTIONS)], size["frames"], seed0 + i) for i in range(size["shots"])]
    settings = GenerationSettings(steps=steps, guidance=4.0, height=size["height"], width=size["width"], fps=16,
                                  mode=mode, moc=MoCSettings(enabled=moc, top_k=5))
    return Story(GLOBAL, shots, settings).validate()


# ---- timing helpers ---------------------------------------------------------------------------

# GiB torch can allocate on an 80 GB H100: 79.65 GiB on the card, less the CUDA context's share
H100_USABLE_GIB = 79.0


def memory_cap(device, gib: float) -> float | None:
    """Cap this process's GPU memory at `gib` GiB (torch.cuda.set_per_process_memory_fraction): on a
    larger GPU an allocation beyond it fails as it would on the smaller one. Returns the cap, or None
    (no GPU, no cap asked, or a GPU no larger than the cap)."""
    if device.type != "cuda" or gib <= 0:
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory / 2 ** 30
    if total <= gib:
        return None
    torch.cuda.set_per_process_memory_fraction(gib / total, index)
    return gib


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _alloc_retries(device) -> int | None:
    return int(torch.cuda.memory_stats(device).get("num_alloc_retries", 0)) if device.type == "cuda" else None


def _peak_gib(device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2) if device.type == "cuda" else None


def timed(fn, device, repeats: int = 1, warmup: int = 0) -> float:
    """Median wall time of `repeats` runs in ms (the device synchronised around each)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


class dense_backend:
    """Dense attention through one SDPA kernel: "cudnn" or "flash" (FlashAttention-2)."""

    def __init__(self, kind: str):
        from torch.nn.attention import SDPBackend
        first = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[kind]
        self.order = [first] + [b for b in moc_attention_module.DENSE_PRIORITY if b != first]

    def __enter__(self):
        self.saved = moc_attention_module.DENSE_PRIORITY
        moc_attention_module.DENSE_PRIORITY = self.order

    def __exit__(self, *exc):
        moc_attention_module.DENSE_PRIORITY = self.saved


def _union(spans) -> float:
    """The length of the union of (start, end) intervals."""
    busy, end = 0.0, float("-inf")
    for s, t in sorted(spans):
        if t > end:
            busy += t - max(s, end)
            end = t
    return busy


def busy_ms(events) -> float:
    """The time a device was busy, in ms: the union of the intervals of `events` (kernels, copies)."""
    return _union((e.time_range.start, e.time_range.end) for e in events if e.time_range.end > e.time_range.start) / 1e3


def classify_busy(kernels, attention_spans, routing_spans) -> dict:
    """Busy time (the union of intervals, in the intervals' unit) of the kernels `kernels` (start, end)
    by the named range each starts in: a routing span, else an attention span (attention excludes
    routing), else the rest. A range's device-side span runs from its first kernel to its last and
    so also covers any idle time inside it: the kernels, not the spans, are summed."""
    def inside(spans):
        spans = sorted(spans)
        starts = [a for a, _ in spans]

        def test(t) -> bool:
            i = bisect.bisect_right(starts, t) - 1
            return i >= 0 and t < spans[i][1]
        return test

    in_routing, in_attention = inside(routing_spans), inside(attention_spans)
    parts: dict[str, list] = {"attention": [], "routing": [], "rest": []}
    for a, b in kernels:
        parts["routing" if in_routing(a) else "attention" if in_attention(a) else "rest"].append((a, b))
    return {"busy": _union(kernels), **{k: _union(v) for k, v in parts.items()}}


HOST_WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
              "cudaFree", "cudaMalloc")  # host calls that can leave the GPU idle (cudaFree waits for the device)


def time_split(fn, device) -> dict:
    """One call of fn under torch.profiler, in ms: the time the device was busy ("device_ms") and
    its split into self-attention (routing excluded), routing and the rest; on the GPU also the
    host calls that wait for it (HOST_WAITS: count and ms) and the caching allocator's device
    allocations and frees during the call. On a CPU the CPU's op times stand in (a check of this code).

    On the GPU the busy time is the union of the kernel and copy intervals on its timeline, and a
    kernel counts for attention or routing when it starts inside the device-side span of the
    engine's named range (moc.ATTENTION_RANGE, moc.ROUTING_RANGE; routing sits inside attention;
    `classify_busy`). The wall time less "device_ms" is the time the GPU sat idle. (The first two GPU
    runs summed the profiler's per-kernel totals; the third took the ranges' spans for attention,
    which include idle time inside them, so its "rest" came out far too small.)"""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    _sync(device)
    if cuda:
        before = torch.cuda.memory_stats(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
        _sync(device)
    if cuda:
        after = torch.cuda.memory_stats(device)
        on_device = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        kernels = [e for e in on_device if not is_range(e.name) and e.time_range.end > e.time_range.start]

        def spans(name: str) -> list:
            return [(e.time_range.start, e.time_range.end) for e in on_device if e.name == name]

        ms = {k: v / 1e3 for k, v in classify_busy([(e.time_range.start, e.time_range.end) for e in kernels],
                                                     spans(ATTENTION_RANGE), spans(ROUTING_RANGE)).items()}
        per_kernel: dict[str, list] = {}
        for e in kernels:
            row = per_kernel.setdefault(e.name[:80], [0.0, 0])
            row[0] += (e.time_range.end - e.time_range.start) / 1e3
            row[1] += 1
        top = [{"name": k, "ms": round(t, 1), "calls": n}
               for k, (t, n) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:8]]
        waits: dict[str, list] = {}
        for e in prof.events():
            if e.device_type == DeviceType.CPU and e.name in HOST_WAITS:
                row = waits.setdefault(e.name, [0, 0.0])
                row[0] += 1
                row[1] += (e.time_range.end - e.time_range.start) / 1e3
        out = {"device_ms": round(ms["busy"], 1), "attention_ms": round(ms["attention"], 1),
               "routing_ms": round(ms["routing"], 1), "rest_ms": round(ms["rest"], 1), "top_kernels": top,
               "host_waits": {k: {"calls": n, "ms": round(t, 1)} for k, (n, t) in sorted(waits.items())},
               "allocator": {k: after.get(k, 0) - before.get(k, 0)
                             for k in ("num_device_alloc", "num_device_free", "num_alloc_retries")}}
        if not spans(ATTENTION_RANGE) and any(e.name == ATTENTION_RANGE for e in prof.events()):
            out["split_note"] = "the named ranges have no device-side spans in this profiler: attention unknown"
        return out
    # each op's own CPU time, counted for the innermost named range it runs in (the range's own
    # wall time would also count the Python between its ops, more of it on a busy machine)
    ms = {"attention": 0.0, "routing": 0.0, "rest": 0.0}
    for e in prof.events():
        if is_range(e.name):
            continue
        kind, parent = "rest", e.cpu_parent
        while parent is not None:
            if parent.name in (ROUTING_RANGE, ATTENTION_RANGE):
                kind = "routing" if parent.name == ROUTING_RANGE else "attention"
                break
            parent = parent.cpu_parent
        ms[kind] += float(e.self_cpu_time_total) / 1e3
    return {"device_ms": round(sum(ms.values()), 1), "attention_ms": round(ms["attention"], 1),
            "routing_ms": round(ms["routing"], 1), "rest_ms": round(ms["rest"], 1), "top_kernels": []}


class auto_choices:
    """Counts what "auto" chose for the sparse selections of the calls inside (engine/moc's
    sparse_choice: "triton" or "gather")."""

    def __enter__(self):
        self.counts, self.saved = {}, moc_attention_module.sparse_choice

        def counted(selection, *args):
            name, plan = self.saved(selection, *args)
            self.counts[name] = self.counts.get(name, 0) + 1
            return name, plan

        moc_attention_module.sparse_choice = counted
        return self.counts

    def __exit__(self, *exc):
        moc_attention_module.sparse_choice = self.saved


# ---- the parts --------------------------------------------------------------------------------

def part_forward(st, size, device, dtype, repeats: int, log, warmup: int = 1) -> list[dict]:
    h, w = size["height"] // 8, size["width"] // 8  # the Wan VAE: 8x smaller per side
    moc = MoCConfig(top_k=5)
    small = story_inputs(st, 2, 2, 8, 12, device, dtype, seed=1)
    ref = forward(st, *small, moc, "reference").float()
    check_errs = {}
    for backend in ("triton", "gather") if device.type == "cuda" else ("reference",):
        fast = forward(st, *small, moc, backend).float()
        rel_err = check_errs[backend] = float((fast - ref).norm() / ref.norm())
        log(f"forward check on {small[0].num_tokens} tokens: {backend} vs reference rel. error {rel_err:.2e}")
    layout, *rest = story_inputs(st, size["shots"], size["frames"], h, w, device, dtype)
    rows = []
    gpu = device.type == "cuda"
    # "moc-auto" is what the engine runs by default (the headline); the two fused backends beside it
    variants = [("moc-auto", moc, "auto", None),
                ("dense-cudnn", None, "auto", "cudnn"), ("dense-flash", None, "auto", "flash"),
                ("moc-triton", moc, "triton" if gpu else "reference", None),
                ("moc-gather", moc, "gather" if gpu else "reference", None)]  # per key chunk (BENCHMARKS.md)
    for name, cfg, backend, dense in variants:
        def run(cfg=cfg, backend=backend):
            return forward(st, layout, *rest, cfg, backend)
        _reset_peak(device)
        with dense_backend(dense or "cudnn"), auto_choices() as chose:  # MoC makes no dense call at 180k
            ms = timed(run, device, repeats, warmup=warmup)
            split = time_split(run, device)
        row = {"variant": name, "tokens": layout.num_tokens, "layers": len(st.model.blocks), "forward_ms": round(ms, 1),
               "peak_gib": _peak_gib(device), **split}
        if gpu:
            row["idle_ms"] = round(ms - split["device_ms"], 1)  # the GPU waiting for the host
        if name == "moc-auto":
            row["auto_chose"] = chose  # sparse_choice per self-attention call, warm-up and timed runs
        rows.append(row)
        log(f"forward {name}: {ms:.1f} ms, split { {k: v for k, v in split.items() if k not in ('top_kernels', 'host_waits')} }, "
            f"peak {row['peak_gib']} GiB" + (f", auto chose {chose}" if name == "moc-auto" else ""))
    by = {r["variant"]: r for r in rows}
    for r in rows:
        r["speedup_vs_cudnn"] = round(by["dense-cudnn"]["forward_ms"] / r["forward_ms"], 3)
        r["speedup_vs_flash"] = round(by["dense-flash"]["forward_ms"] / r["forward_ms"], 3)
    rows[0]["check_rel_err"] = max(check_errs.values())
    rows[0]["check_rel_err_by_backend"] = check_errs
    return rows


def part_scaling(st, size, device, dtype, log) -> list[dict]:
    h, w = size["height"] // 8, size["width"] // 8
    moc = MoCConfig(top_k=5)
    gpu = device.type == "cuda"
    rows = []
    for shots in range(1, size["shots"] + 1):
        layout, *rest = story_inputs(st, shots, size["frames"], h, w, device, dtype)
        row = {"shots": shots, "tokens": layout.num_tokens}
        for name, cfg, backend in (("moc_ms", moc, "auto"), ("moc_triton_ms", moc, "triton" if gpu else "reference"),
                                   ("moc_gather_ms", moc, "gather" if gpu else "reference"),
                                   ("dense_cudnn_ms", None, "auto")):
            with dense_backend("cudnn"):  # the dense row's kernel; MoC makes no dense call
                # a warm-up at every size: the kernels autotune per chunk-count bucket (the first GPU
                # run timed 2 shots at 17 s without it)
                row[name] = round(timed(lambda: forward(st, layout, *rest, cfg, backend), device, 1, warmup=1), 1)
        row["speedup"] = round(row["dense_cudnn_ms"] / row["moc_ms"], 3)
        rows.append(row)
        log(f"scaling {shots} shots ({layout.num_tokens} tokens): MoC (auto) {row['moc_ms']} ms, tile kernels "
            f"{row['moc_triton_ms']} ms, gather {row['moc_gather_ms']} ms, dense {row['dense_cudnn_ms']} ms")
    return rows


def profiled(fn, device, log, label: str, top: int = 12):
    """fn() under torch.profiler; logs the top kernels by device time and the top host operations
    by their own host time (where a slow phase spends it). Returns fn's result."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        result = fn()
    events = prof.key_averages()
    if cuda:
        kernels = sorted((e for e in events if e.device_type == DeviceType.CUDA),
                         key=lambda e: -e.device_time_total)[:top]
        log(f"{label}, kernels: " + "; ".join(f"{e.key[:48]} {e.device_time_total / 1e3:.1f} ms x{e.count}"
                                              for e in kernels))
    host = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    log(f"{label}, host: " + "; ".join(f"{e.key[:48]} {e.self_cpu_time_total / 1e3:.1f} ms x{e.count}" for e in host))
    return result


def phase_split(marks: list[tuple[str, float]], start: float, end: float) -> dict[str, float]:
    """Wall seconds of a render by phase, from its progress events in order: "before" (planning,
    the cached shots), "context" (context passes), "sampling" (from a run's start to its last
    step), "after" (from a run's last step on: decoding, videos, the next run's set-up, the story
    files). Each mark opens its phase, which lasts to the next mark (the last to `end`). On a GPU
    the events come from the host, which runs at most a queue ahead of the device."""
    out = {"before": 0.0, "context": 0.0, "sampling": 0.0, "after": 0.0}
    points = [("before", start), *marks, ("end", end)]
    for (phase, t), (_, t_next) in itertools.pairwise(points):
        out[phase] += max(0.0, t_next - t)
    return {k: round(v, 3) for k, v in out.items()}


def context_passes(marks: list[tuple[str, float]], end: float) -> list[float]:
    """Wall seconds of each context pass, in order, from the same marks as `phase_split`."""
    points = [*marks, ("end", end)]
    return [round(t_next - t, 3) for (phase, t), (_, t_next) in itertools.pairwise(points) if phase == "context"]


def part_render(engine, size, device, steps: int, out: Path, dense: bool, log, profile_regenerate: bool = False,
                shot_by_shot: bool = True, skip: set[str] = frozenset()) -> dict:
    from engine.events import Progress, ShotDone

    marks: list[tuple[str, float]] = []  # (phase, when) of the render in flight, for its phase split

    def on_event(event):
        if isinstance(event, Progress):
            if event.step in (0, event.total):  # a context pass, a run's start, a run's last step
                phase = "context" if event.context is not None else "sampling" if event.step == 0 else "after"
                marks.append((phase, time.perf_counter()))
                log(f"  {event.message}")
        elif isinstance(event, ShotDone):
            s = event.result
            log(f"  shot {s.index + 1}: {s.status}, {s.seconds:.1f} s, {s.frames} frames -> {s.video_path}")

    def render(story, name, profiled_as=None, **kw):
        from engine.engine import ResourceError
        _reset_peak(device)
        marks.clear()
        retries0 = _alloc_retries(device)
        t0 = time.perf_counter()
        try:
            go = lambda: engine.render(story, out_dir=out / name, on_event=on_event, **kw)
            result = profiled(go, device, log, profiled_as) if profiled_as else go()
        except ResourceError as err:  # out of memory under the cap: the engine's message, recorded
            log(f"render {name}: {err}")
            return {"render": name, "seconds": None, "peak_gib": _peak_gib(device), "error": str(err),
                    "videos_ok": False}
        seconds = time.perf_counter() - t0
        videos = [probe(s.video_path) for s in result.shots] + [probe(result.story_video)]
        row = {"render": name, "seconds": round(seconds, 2), "peak_gib": _peak_gib(device),
               "statuses": [s.status for s in result.shots], "sparsity": result.summary.get("sparsity"),
               "videos": videos, "videos_ok": all(v["codec"] == "h264" and v["frames"] > 0 for v in videos)}
        if result.summary.get("both_sides") is not None:
            row["both_sides"] = result.summary["both_sides"]
        row["context_passes"] = result.summary.get("context_passes")  # run, and kept from the render before
        row["phases_s"] = phase_split(marks, t0, t0 + seconds)
        row["context_passes_s"] = context_passes(marks, t0 + seconds)
        if retries0 is not None:  # the allocator freed its cache and retried (each a device-wide wait)
            row["alloc_retries"] = _alloc_retries(device) - retries0
        if row["context_passes_s"]:
            log(f"render {name}: context passes {row['context_passes_s']} s")
        log(f"render {name}: {seconds:.1f} s, peak {row['peak_gib']} GiB, {row['statuses']}, phases {row['phases_s']}")
        return row

    rows = []
    joint = make_story(size, steps, "joint", True)
    rows.append(render(joint, "moc_joint"))
    middle = (size["shots"] - 1) // 2  # shot 4 of 8: regenerated with the others as cached context
    again = make_story(size, steps, "joint", True)
    again.shots[middle].seed = 9_999  # a new take of it
    # the app's default: both sides as context (the later shots too); then earlier shots only
    row = render(again, "moc_joint_regenerate", regenerate=middle,
                 profiled_as="regenerate, both sides" if profile_regenerate else None)
    rows.append({**row, "regenerated_shot": middle})
    # another take of the same shot, as a user trying takes makes it: the other shots' context K/V
    # were kept by the regeneration before (SamplerOptions.keep_context, on by default), so none of
    # the seven context passes runs again
    options = engine.options
    again.shots[middle].seed = 9_995
    if "moc_joint_regenerate_kept" not in skip:
        rows.append({**render(again, "moc_joint_regenerate_kept", regenerate=middle), "regenerated_shot": middle})
    # the rows below read their context afresh (keep_context off), as the first regeneration did
    engine.options = dataclasses.replace(options, keep_context=False)
    again.shots[middle].seed = 9_998  # another new take, so it is sampled again
    row = render(again, "moc_joint_regenerate_earlier", regenerate=middle, both_sides=False,
                 profiled_as="regenerate, earlier shots only" if profile_regenerate else None)
    rows.append({**row, "regenerated_shot": middle})
    # the same both-sided regeneration again, now with consecutive cached shots read in one context
    # pass each where memory allows (SamplerOptions.context_pass_tokens=0; one pass per shot is the
    # default), then one pass per shot once more: each against the other with the process equally warm
    for name, tokens, seed in (("moc_joint_regenerate_grouped", 0, 9_997),
                               ("moc_joint_regenerate_again", options.context_pass_tokens, 9_996)):
        if name in skip:
            continue
        engine.options = dataclasses.replace(options, context_pass_tokens=tokens, keep_context=False)
        again.shots[middle].seed = seed
        rows.append({**render(again, name, regenerate=middle), "regenerated_shot": middle})
    engine.options = options
    if shot_by_shot:
        rows.append(render(make_story(size, steps, "shot_by_shot", True, seed0=200), "moc_shot_by_shot"))
    if dense:
        with dense_backend("cudnn"):
            rows.append(render(make_story(size, steps, "joint", False, seed0=300), "dense_cudnn_joint"))
        with dense_backend("flash"):
            rows.append(render(make_story(size, steps, "joint", False, seed0=400), "dense_flash_joint"))
    by = {r["render"]: r for r in rows}

    def speedup(name: str) -> float | None:  # the joint render's seconds over this row's
        joint, other = by["moc_joint"]["seconds"], by.get(name, {}).get("seconds")
        return round(joint / other, 3) if joint and other else None
    return {"rows": rows, "regenerate_speedup": speedup("moc_joint_regenerate"),
            "regenerate_speedup_earlier_only": speedup("moc_joint_regenerate_earlier"),
            "regenerate_speedup_kept_context": speedup("moc_joint_regenerate_kept")}


def probe(path) -> dict:
    """What a player sees in a written MP4: codec, frames decoded, size."""
    import av
    path = Path(path)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        codec = stream.codec_context.name
    return {"name": path.name, "codec": codec, "frames": frames, "bytes": path.stat().st_size}


# ---- the plot ---------------------------------------------------------------------------------

def plot_scaling(rows: list[dict], png: Path, title: str) -> Path:
    """The scaling table as a line chart (Pillow): forward seconds against tokens, MoC and dense."""
    from PIL import Image, ImageDraw
    W, H, L, R, T, B = 900, 560, 90, 30, 60, 70
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    xs = [r["tokens"] for r in rows]
    ymax = max(max(r["moc_ms"], r["dense_cudnn_ms"]) for r in rows) / 1e3 * 1.1
    xmax = max(xs) * 1.05

    def px(x, y):
        return L + x / xmax * (W - L - R), H - B - y / ymax * (H - T - B)

    d.line([px(0, 0), px(xmax, 0)], fill="black", width=2)
    d.line([px(0, 0), px(0, ymax)], fill="black", width=2)
    for i in range(6):
        y = ymax * i / 5
        d.line([px(0, y), px(xmax, y)], fill=(225, 225, 225))
        d.text((8, px(0, y)[1] - 6), f"{y:.1f} s" if ymax >= 2 else f"{y * 1e3:.0f} ms", fill="black")
    for x in xs:
        d.text((px(x, 0)[0] - 16, H - B + 8), f"{x / 1000:.1f}k" if x >= 1000 else str(x), fill="black")
    for key, colour, label in (("dense_cudnn_ms", (200, 60, 50), "dense (cuDNN)"), ("moc_ms", (40, 90, 200), "MoC")):
        pts = [px(r["tokens"], r[key] / 1e3) for r in rows]
        d.line(pts, fill=colour, width=3)
        for x, y in pts:
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
        d.text((pts[-1][0] - 120, pts[-1][1] - 22), label, fill=colour)
    d.text((L, 20), title, fill="black")
    d.text((W // 2 - 80, H - 28), "story tokens (1 to 8 shots)", fill="black")
    png.parent.mkdir(parents=True, exist_ok=True)
    img.save(png)
    return png


# ---- main -------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="forward,scaling,render", help="comma-separated: forward, scaling, render")
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps of each render (default: the app's, GenerationSettings.steps; guidance "
                        "doubles the forwards)")
    p.add_argument("--memory-gib", type=float, default=H100_USABLE_GIB,
                   help="cap this process's GPU memory at this many GiB (default: what torch can allocate on an "
                        "80 GB H100), so a larger GPU shows whether the story fits one H100; 0: no cap")
    p.add_argument("--repeats", type=int, default=2, help="timed forwards per variant (median)")
    p.add_argument("--render-dense", action="store_true", help="also render the story with dense cuDNN and flash")
    p.add_argument("--profile-regenerate", action="store_true",
                   help="render part: run both regenerations under torch.profiler and log their top kernels "
                        "and host operations (slower; their seconds then include the profiler)")
    p.add_argument("--no-shot-by-shot", action="store_true", help="render part: leave out the shot-by-shot render")
    p.add_argument("--skip", default="", help="render part: comma-separated render rows to leave out "
                                              "(moc_joint_regenerate_kept, moc_joint_regenerate_grouped, "
                                              "moc_joint_regenerate_again)")
    p.add_argument("--layers", type=int, default=None, help="transformer layers (default: 30; tiny: 2)")
    p.add_argument("--compile", action="store_true",
                   help="compile the transformer's blocks first (StoryTransformer.compile_blocks; the first "
                        "forward of each variant compiles, outside the timed runs)")
    p.add_argument("--tiny", action="store_true", help="a tiny model and story (a CPU check of this script)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--work", type=Path, default=None, help="checkpoint and cache folder (default: a temporary one)")
    p.add_argument("--log-dir", type=Path, default=None, help="the renders' videos and this run's log go here")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None, help="draw the scaling table of this JSON and exit")
    p.add_argument("--png", type=Path, default=ROOT / "docs" / "e2e_scaling.png")
    args = p.parse_args(argv)
    if args.plot is not None:
        data = json.loads(args.plot.read_text())
        print(plot_scaling(data["scaling"], args.png, f"One Wan2.1-1.3B-architecture forward, {data['device']}"))
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/e2e.py needs a CUDA GPU (or --tiny --device cpu for a check)")
    if args.steps is None:
        from engine.story import GenerationSettings
        args.steps = GenerationSettings().steps
    cap = memory_cap(device, args.memory_gib)
    size = dict(TINY if args.tiny else FULL)
    size["layers"] = args.layers or size["layers"]
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = set(parts) - {"forward", "scaling", "render"}
    if unknown:
        raise SystemExit(f"--parts takes forward, scaling and render; got {sorted(unknown)}")
    work = args.work or Path(tempfile.mkdtemp(prefix="e2e_"))
    log_dir = args.log_dir or work / "out"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = (log_dir / "e2e_log.txt").open("a")

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    from engine.engine import StoryEngine
    t0 = time.perf_counter()
    folder = work / "wan"
    if not (folder / "model_index.json").exists():
        build_checkpoint(folder, args.tiny, size["layers"], device)
    engine = StoryEngine.load(folder, device=str(device), cache_dir=work / "cache")
    log(f"checkpoint built and loaded in {time.perf_counter() - t0:.1f} s: {engine.model_name}, {size}")
    st, dtype = engine.model.transformer, engine.model.dtype
    if args.compile:
        st.compile_blocks()
    result: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "torch": torch.__version__,
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "model": "Wan2.1-1.3B architecture, random weights" + (" (tiny check)" if args.tiny else ", bf16"),
                    "story": size, "top_k": 5, "steps": args.steps, "guidance": 4.0, "memory_cap_gib": cap,
                    "compiled": args.compile}
    def write_json() -> None:  # after every part: a call cut short still brings back what was measured
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1) + "\n")

    if "forward" in parts:
        rows = part_forward(st, size, device, dtype, args.repeats, log, warmup=2 if args.compile else 1)
        result["forward"] = rows
        result["forward_speedup_vs_cudnn"] = rows[0]["speedup_vs_cudnn"]
        result["forward_speedup_vs_flash"] = rows[0]["speedup_vs_flash"]
        write_json()
    if "scaling" in parts:
        result["scaling"] = part_scaling(st, size, device, dtype, log)
        write_json()
    if "render" in parts:
        render = part_render(engine, size, device, args.steps, log_dir, args.render_dense, log,
                             profile_regenerate=args.profile_regenerate, shot_by_shot=not args.no_shot_by_shot,
                             skip={x.strip() for x in args.skip.split(",") if x.strip()})
        result["render"] = render["rows"]
        result["regenerate_speedup"] = render["regenerate_speedup"]
        result["regenerate_speedup_earlier_only"] = render["regenerate_speedup_earlier_only"]
        result["regenerate_speedup_kept_context"] = render["regenerate_speedup_kept_context"]
    print(json.dumps({k: v for k, v in result.items() if k.endswith("speedup") or "speedup_vs" in k}))
    write_json()
    if "scaling" in parts:
        try:
            log(f"plot: {plot_scaling(result['scaling'], log_dir / 'e2e_scaling.png', 'One forward: ' + result['device'])}")
        except ImportError:
            log("plot skipped (no Pillow here): run --plot JSON where it is")
    return 0


if __name__ == "__main__":
    sys.exit(main())
