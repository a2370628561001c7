"""The sampler: flow matching over a diffusers scheduler, shot by shot or jointly, with context.

For: `StorySampler`, the per-render state (story geometry, encoded captions, the context K/V
cache) with `sample(run)` (denoise the live shots of one run, every step: stop check, forward,
guidance, scheduler step, callback with the clean estimate and routing density) and
`encode_context(shot, latents, seed)` (one context pass: the shot's clean latents re-noised to
t_c, its K/V written once into the cache and reused by every later step).
Not for: choosing which shots to generate, keys, files (engine.py).

A run denoises shots [m, e) together; shots [0, m) are fixed context. Latent frames are
concatenated along time in story order, so a run is one token sequence (frame-major).
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch

from engine.backbone import make_cross_plan
from engine.context_cache import ContextKV
from engine.events import RenderStopped
from engine.moc import TokenLayout
from engine.parallel import SequenceParallel
from engine.processors import ForwardPlan, SelfAttentionPlan
from engine.routing_report import RoutingRecorder
from engine.story import Story

# activation bytes of a forward per token and batch entry: dim x (elem + 8) (the hidden states and
# Wan's float32 residual and norm temporaries) + 2 x ffn_dim x elem (the FFN's inner activations),
# x ACTIVATION_MARGIN. The formula gives 100 KiB a token for Wan2.1-1.3B with guidance; its joint
# render at MoC-180k peaked at 19.8 GiB with the weights (H100, benchmarks/results/e2e_h100.json),
# 115 KiB a token
ACTIVATION_MARGIN = 1.3


def free_gpu_bytes(device: torch.device) -> int:
    """Bytes this process can still allocate on `device`: the GPU's free memory plus what torch's
    allocator holds unused, within the per-process memory fraction when one is set."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    allocated = torch.cuda.memory_allocated(index)
    held = torch.cuda.memory_reserved(index) - allocated
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 1.0)(index)
    return max(0, min(free + held, int(fraction * total) - allocated))


@dataclass(frozen=True)
class SamplerOptions:
    context_cache: bool = True  # False: recompute the context tokens every step (the baseline)
    preview: bool = True  # decode a preview of the clean estimate every step
    # both-sided regeneration: k' > 0 = the regenerated shot keeps its causal top-k slot for slot and
    # routes k' more among the later chunks (MoCConfig.open_top_k); 0 = the later shots' chunks
    # compete with the earlier ones in the one top-k. 2 by default: with the shipped model (run 16)
    # on 68 held-out stories (benchmarks/quality.py --memory --open-top-k 2; 30 on an H200, 38 on the
    # CPU) it kept the look in 17 of 48 regenerations, against 13 with the one shared top-k and 18
    # with earlier shots only (model card, "Regenerating a middle shot").
    open_top_k: int = 2
    # query tokens of one context pass: 1 = one pass per cached shot; more = several consecutive
    # cached shots share a pass where routing is causal (StorySampler.can_group) up to this many
    # tokens; 0 = as many as the GPU's free memory holds beside the context K/V cache (all of them on
    # the CPU). One per shot by default: on the CPU grouping was no faster (the default 4-shot story,
    # regenerating shot 3 both-sided: 10.36 s grouped against 10.08 s, benchmarks/context_cache.py
    # --only grouped), nor on an H100 at MoC-180k (2 grouped passes 9.2 s against 7 single ones
    # 6.7 s, 6 GiB higher peak: benchmarks/results/e2e_render_kept_h100.json)
    context_pass_tokens: int = 1
    # keep the context K/V cache after a render that filled it (StoryEngine): the next render that
    # reads context skips every pass whose inputs are unchanged (another take of the same shot reads
    # the other shots again for nothing otherwise). It holds its memory between renders (at
    # MoC-180k with guidance, 62 GiB on a GPU); a render that reads no context frees it first
    keep_context: bool = True


@dataclass(frozen=True)
class Run:
    shots: tuple[int, ...]  # live shots, consecutive story indices m..e-1
    seeds: tuple[int, ...]  # initial-noise seed of each live shot

    @property
    def start(self) -> int:
        return self.shots[0]

    @property
    def end(self) -> int:
        return self.shots[-1] + 1


@dataclass
class StepInfo:
    run: Run
    step: int  # 1-based
    total: int
    x0: torch.Tensor  # (C, F_live, h, w) clean estimate of the live shots
    density: float  # attention density of this step (1.0 = dense)


class StorySampler:
    def __init__(self, model, story: Story, *, stop: threading.Event | None = None,
                 on_step: Callable[[StepInfo], None] | None = None, options: SamplerOptions = SamplerOptions(),
                 parallel: SequenceParallel | None = None, kv: ContextKV | None = None):
        """kv: the context K/V cache an earlier render of this model kept (SamplerOptions.keep_context):
        used when its shape fits this story, its recorded passes skipped where their keys match."""
        self.model = model
        self.kept_kv = kv
        # sequence parallelism: every rank runs this sampler in step; each forward is spread over
        # the ranks and returns the whole output on each. The context K/V cache and the routing
        # statistics hold this rank's heads (`heads`), the statistics merged after every forward set
        self.parallel = parallel
        self.story = story
        self.settings = story.settings
        self.stop = stop
        self.on_step = on_step
        self.options = options
        self.device = model.device
        tr = model.transformer
        self.transformer = tr
        self.heads = parallel.heads(tr.num_heads) if parallel is not None else (0, tr.num_heads)
        C, _, self.h, self.w = model.codec.latent_shape(1, self.settings.height, self.settings.width)
        self.channels = C
        self.frame_tokens = tr.frame_tokens(self.h, self.w)
        self.shot_frames = [s.frames for s in story.shots]
        moc = self.settings.moc
        pins, blocks = story.links()
        self.moc_config = moc.to_config(pins=pins, blocks=blocks) if moc.enabled else None
        self.backend = moc.backend
        self.guided = self.settings.guidance > 1.0
        self.batch = 2 if self.guided else 1
        # captions: [cond, uncond] x [global, shot 0, shot 1, ...]
        enc = model.text_encoder
        cond = enc.encode([story.global_caption] + [s.caption for s in story.shots])
        self.segments = [cond]
        if self.guided:
            neg = enc.encode([self.settings.negative_caption] + [""] * len(story.shots))
            self.segments.append(neg)
        self.kv: ContextKV | None = None
        self._layouts: dict[int, TokenLayout] = {}  # end -> layout of shots [0, end)
        self._inputs: tuple | None = None  # (key, (text, cross plan, rotary)) of the last forward's shape
        self.context_latents: dict[int, torch.Tensor] = {}  # shot -> noisy context latents (recompute path)
        self.forwards = 0  # transformer forwards (work counter)
        self.passes_run = 0  # context passes run (work counter)
        self.passes_kept = 0  # context passes served from a kept cache instead of run (work counter)
        self.forward_tokens = 0  # query tokens pushed through the transformer (work counter)
        self.attn_flops_moc = 0.0  # self-attention FLOPs of every forward (work counter)
        self.attn_flops_dense = 0.0  # the same forwards with dense attention

    # ---- geometry -----------------------------------------------------------------------------

    def layout(self, end: int) -> TokenLayout:
        """Token layout of shots [0, end): one object per `end` for the whole render, so the tables
        routing and the kernels derive from it (TokenLayout.memo, copied to the GPU once) are built
        once, not once per forward (each copy would make the host wait for the GPU)."""
        if end not in self._layouts:
            moc = self.settings.moc
            self._layouts[end] = TokenLayout(frame_tokens=self.frame_tokens, shot_frames=tuple(self.shot_frames[:end]),
                                             chunking=moc.chunking, chunk_size=moc.chunk_size)
        return self._layouts[end]

    def shot_latent_shape(self, shot: int) -> tuple[int, int, int, int]:
        return (self.channels, self.shot_frames[shot], self.h, self.w)

    def _kv(self) -> ContextKV:
        if self.kv is None:
            tr = self.transformer
            args = (tr.num_layers, self.batch, self.layout(len(self.shot_frames)).num_tokens,
                    self.heads[1] - self.heads[0], tr.head_dim)
            kwargs = {"dtype": self.model.dtype, "device": self.device,
                      "route_keys": self.settings.moc.enabled and not self.settings.moc.descriptor_rope}
            kept, self.kept_kv = self.kept_kv, None
            if kept is not None and kept.spec == ContextKV.describe(*args, **kwargs):
                kept.restart()
                self.kv = kept
            else:
                del kept  # a cache of another shape: freed before the new one is allocated
                self.kv = ContextKV(*args, **kwargs)
        return self.kv

    def _check_stop(self, where: str) -> None:
        """Raise RenderStopped if the stop flag is set. With several ranks rank 0's flag decides and
        every rank receives the answer, so all of them stop at the same step (a rank that stopped
        alone would leave the others waiting in the next forward's collectives)."""
        def asked() -> bool:
            return self.stop is not None and self.stop.is_set()
        stopped = self.parallel.on_rank0(asked) if self.parallel is not None else asked()
        if stopped:
            raise RenderStopped(f"stopped by request {where}")

    # ---- one forward --------------------------------------------------------------------------

    def _forward(self, x: torch.Tensor, timestep: torch.Tensor, end: int, q_offset: int,
                 live: list[int], kv: ContextKV | None, recorder: RoutingRecorder | None,
                 moc=None) -> torch.Tensor:
        """x (C, F, h, w) live latents; timestep () or (N,). Returns the guided flow (C, F, h, w)."""
        layout = self.layout(end)
        B = self.batch
        ranges = []
        for s in live:
            a, b = layout.shot_range(s)
            ranges.append((a - q_offset, b - q_offset, s))
        frame_start = layout.shot_frame_range(live[0])[0]
        frames = x.shape[1]
        key = (end, tuple(ranges), frame_start, frames)
        if self._inputs is None or self._inputs[0] != key:  # every step of a run reuses them
            text, cross = make_cross_plan([seg[:end + 1] for seg in self.segments], ranges, self.device)
            rotary = self.transformer.rotary(frame_start, frames, self.h, self.w, self.device)
            self._inputs = key, (text, cross, rotary)
        text, cross, rotary = self._inputs[1]
        plan = ForwardPlan(
            self_attn=SelfAttentionPlan(layout=layout, q_offset=q_offset, moc=moc or self.moc_config,
                                        backend=self.backend, kv=kv, recorder=recorder, parallel=self.parallel),
            cross_attn=cross, rotary=rotary)
        dtype = self.model.dtype
        xb = x[None].expand(B, *x.shape).to(self.device, dtype)
        if timestep.ndim == 0 and timestep.device.type == "cpu":  # made on the device: no copy to wait for
            t = torch.full((), float(timestep), dtype=torch.float32, device=self.device)
        else:
            t = timestep.to(self.device, torch.float32)
        tb = t[None].expand(B, *t.shape) if t.ndim == 1 else t.expand(B)
        with torch.no_grad():
            out = self.transformer.forward(xb, tb, text.to(dtype), plan).float()
        self.forwards += 1
        self.forward_tokens += out.shape[2] * self.frame_tokens * B
        if self.guided:
            cond, uncond = out[0], out[1]
            return uncond + self.settings.guidance * (cond - uncond)
        return out[0]

    # ---- context ------------------------------------------------------------------------------

    def noisy_context(self, shot: int, latents: torch.Tensor, noise_seed: int) -> torch.Tensor:
        """Clean latents re-noised to t_c along the flow: (1 - t_c) x0 + t_c noise."""
        t_c = self.settings.context_noise
        g = torch.Generator().manual_seed(noise_seed)
        noise = torch.randn(latents.shape, generator=g)
        x = (1 - t_c) * latents.float().cpu() + t_c * noise
        if torch.device(self.device).type == "cuda":  # pinned: the copy need not wait for the GPU's queue
            return x.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device)

    def hold_context(self, shot: int) -> None:
        """Keep shot `shot`'s positions in the context K/V without a pass: a both-sided
        regeneration replaces it, and the later shots' passes (`exclude`) never look at it."""
        kv = self._kv()
        a, b = self.layout(shot + 1).shot_range(shot)
        kv.mark_context(a, b)

    def holds_pass(self, shots: list[int], key: str) -> bool:
        """Whether the pass over `shots` named `key` would be served from the kept K/V cache."""
        if self.kv is None and self.kept_kv is None or not self.options.context_cache:
            return False
        kv = self._kv()
        layout = self.layout(shots[-1] + 1)
        a, b = layout.shot_range(shots[0])[0], layout.shot_range(shots[-1])[1]
        return kv.context_end == a and kv.holds(a, b, key)

    def encode_context(self, shot: int, latents: torch.Tensor, noise_seed: int, exclude: tuple[int, ...] = (),
                       key: str | None = None) -> bool:
        """Make shot `shot` (with every earlier shot already context) context for later shots.
        exclude: earlier shots this pass must not attend (blocked for it; a pin on them is dropped)."""
        return self.encode_contexts([shot], [latents], [noise_seed], exclude, key)

    def can_group(self) -> bool:
        """Whether consecutive context shots may share one pass: only where no shot's queries can
        see a later shot's keys (causal MoC routing, no pin forward in the story), so that a shot's
        K/V in a shared pass are what its own pass after the earlier ones would write. Dense
        attention (MoC off) sees every key of the forward, so it never groups."""
        moc = self.moc_config
        return (self.options.context_cache and moc is not None and moc.causal
                and all(k < q for q, k in moc.pins))

    def context_pass_tokens(self) -> int:
        """Query tokens one context pass may take: SamplerOptions.context_pass_tokens when set (> 0),
        else on a GPU what the memory left beside the context K/V cache holds (the activation bytes
        per token and batch entry of the formula above ACTIVATION_MARGIN), else no limit."""
        if self.options.context_pass_tokens > 0:
            return self.options.context_pass_tokens
        device = torch.device(self.device)
        if device.type != "cuda":
            return 1 << 62
        self._kv()  # allocated first: the pass runs beside it
        free = free_gpu_bytes(device)
        cfg = self.transformer.config
        dim = cfg.num_attention_heads * cfg.attention_head_dim
        elem = torch.finfo(self.model.dtype).bits // 8
        per_token = self.batch * (dim * (elem + 8) + 2 * cfg.ffn_dim * elem) * ACTIVATION_MARGIN
        world = self.parallel.world if self.parallel is not None else 1  # each rank holds 1 / world of them
        return max(1, int(free * world // per_token))

    def context_groups(self, shots: list[int]) -> list[list[int]]:
        """`shots` (consecutive, in story order) cut into the context passes that read them: as
        few as `context_pass_tokens` allows where `can_group`, else one pass per shot."""
        if not self.can_group():
            return [[s] for s in shots]
        # with several ranks rank 0's budget decides: every rank must run the same passes
        budget = (self.context_pass_tokens() if self.parallel is None
                  else self.parallel.on_rank0(self.context_pass_tokens))
        frame = self.frame_tokens
        groups: list[list[int]] = []
        for s in shots:
            tokens = self.shot_frames[s] * frame
            if groups and (sum(self.shot_frames[g] for g in groups[-1]) * frame + tokens) <= budget:
                groups[-1].append(s)
            else:
                groups.append([s])
        return groups

    def encode_contexts(self, shots: list[int], latents: list[torch.Tensor], noise_seeds: list[int],
                        exclude: tuple[int, ...] = (), key: str | None = None) -> bool:
        """Make `shots` (consecutive, in story order, every earlier shot already context) context
        for later shots in one pass: the shots' latents re-noised and denoised together at t_c,
        each attending its own shot and what routing picks among the earlier ones (`can_group`
        must hold for more than one shot). A pass that runs out of GPU memory is run again one
        shot at a time. exclude: earlier shots these must not attend (blocked; a pin on them is dropped).
        key: names everything the pass reads (the engine's `context_pass_key`); where the K/V cache
        still holds that pass's output (kept from an earlier render) it is not run again.
        Returns whether the pass was served from the kept cache."""
        shots = list(shots)
        if any(b != a + 1 for a, b in itertools.pairwise(shots)):
            raise ValueError(f"context shots of one pass must be consecutive, got {[s + 1 for s in shots]}")
        if len(shots) > 1 and not self.can_group():
            raise ValueError("several shots in one context pass need causal MoC routing with the context K/V cache")
        label = f"shot {shots[0] + 1}" if len(shots) == 1 else f"shots {shots[0] + 1}-{shots[-1] + 1}"
        self._check_stop(f"before the context pass of {label}")
        if key is not None and self.holds_pass(shots, key):
            layout = self.layout(shots[-1] + 1)
            self.kv.mark_context(layout.shot_range(shots[0])[0], layout.shot_range(shots[-1])[1], key)
            self.passes_kept += 1
            return True
        xs = [self.noisy_context(s, x, seed) for s, x, seed in zip(shots, latents, noise_seeds)]
        if not self.options.context_cache:
            if exclude:
                raise ValueError("excluding shots from a context pass needs the context K/V cache")
            self.context_latents.update(zip(shots, xs))
            return False
        moc = None
        if exclude:
            if self.moc_config is None:
                raise ValueError("excluding shots from a context pass needs MoC routing (settings.moc.enabled)")
            gone = {(s, e) for s in shots for e in exclude}
            moc = replace(self.moc_config, pins=tuple(p for p in self.moc_config.pins if p not in gone),
                          blocks=tuple(sorted(set(self.moc_config.blocks) | gone)))
        kv = self._kv()
        end = shots[-1] + 1
        layout = self.layout(end)
        a, b = layout.shot_range(shots[0])[0], layout.shot_range(shots[-1])[1]
        t_c = torch.tensor(self.settings.context_noise * self.model.num_train_timesteps)
        work = RoutingRecorder(layout, shots, a, self.transformer.num_layers, self.transformer.num_heads, 1,
                               head_range=self.heads)
        work.begin_step(-1)  # count work only, record no routing maps
        try:
            self._forward(torch.cat(xs, dim=1), t_c, end, a, shots, kv, work, moc)
        except torch.OutOfMemoryError:
            if len(shots) == 1 or self.parallel is not None:  # ranks must not retry apart
                raise
            del xs
            torch.cuda.empty_cache()
            for s, x, seed in zip(shots, latents, noise_seeds):
                self.encode_contexts([s], [x], [seed], exclude)
            return False
        if self.parallel is not None:
            work.merge(self.parallel)
        self.attn_flops_moc += work.total_flops_moc
        self.attn_flops_dense += work.total_flops_dense
        kv.mark_context(a, b, key)
        self.passes_run += 1
        return False

    # ---- a run --------------------------------------------------------------------------------

    def sample(self, run: Run, run_index: int = 0,
               context_after: bool = False) -> tuple[dict[int, torch.Tensor], RoutingRecorder, float]:
        """Denoise the live shots of `run`. Returns ({shot: clean latents (C, f, h, w)}, recorder, seconds).
        context_after: the shots after the run are fixed context too (both-sided regeneration):
        the earlier shots encoded, the run's shot held (`hold_context`), the later shots encoded
        with it excluded, in order; the run's queries may then route to later chunks
        (MoCConfig.open_shots) and write their K/V into the held positions."""
        started = time.perf_counter()
        steps = self.settings.steps
        end = len(self.shot_frames) if context_after else run.end
        layout = self.layout(end)
        q_offset = layout.shot_range(run.start)[0]
        q_end = layout.shot_range(run.end - 1)[1]
        moc = None
        if context_after and self.moc_config is not None:
            moc = replace(self.moc_config, open_shots=tuple(run.shots), open_top_k=self.options.open_top_k)
        noise = [torch.randn(self.shot_latent_shape(s), generator=torch.Generator().manual_seed(seed))
                 for s, seed in zip(run.shots, run.seeds)]
        x = torch.cat(noise, dim=1).to(self.device)  # (C, F_live, h, w), frames in story order
        # a run with no context before or after it (joint mode, or the first run) attends only its
        # own live tokens: the K/V buffers would hold nothing but a copy of them (at MoC-180k with
        # guidance, 62 GiB beside a 20 GiB forward), and later runs re-encode it as context anyway
        use_cache = self.options.context_cache and (q_offset > 0 or context_after)
        recorder = RoutingRecorder(layout, list(run.shots), q_offset if use_cache else 0,
                                   self.transformer.num_layers, self.transformer.num_heads, steps,
                                   head_range=self.heads)
        kv = None
        if context_after and not use_cache:
            raise ValueError("later shots as context need the context K/V cache (SamplerOptions.context_cache)")
        if use_cache:
            kv = self._kv()
            if context_after:
                if kv.context_end != layout.num_tokens:
                    raise RuntimeError(f"context K/V covers {kv.context_end} of {layout.num_tokens} tokens: encode "
                                       "every shot (the regenerated one with its current take) first")
                kv.open_hole(q_offset, q_end)
            else:
                if kv.context_end != q_offset:
                    raise RuntimeError(f"context K/V covers {kv.context_end} tokens but shot {run.start + 1} "
                                       f"starts at token {q_offset}: encode the context shots first")
                kv.invalidate(q_offset)
        scheduler = self.model.new_scheduler()
        scheduler.set_timesteps(steps, device=self.device)
        T = self.model.num_train_timesteps
        t_c = self.settings.context_noise * T
        host_timesteps = scheduler.timesteps.cpu().tolist()  # read once: no wait for the GPU per step
        for i, t in enumerate(scheduler.timesteps):
            self._check_stop(f"at step {i + 1}/{steps} of shot{'s' if len(run.shots) > 1 else ''} "
                             f"{', '.join(str(s + 1) for s in run.shots)}")
            recorder.begin_step(i)
            if use_cache:
                flow = self._forward(x, t.float().reshape(()), end, q_offset, list(run.shots), kv, recorder, moc)
            elif q_offset == 0:  # no context: the live tokens are the whole layout
                flow = self._forward(x, t.float().reshape(()), end, 0, list(run.shots), None, recorder, moc)
            else:
                # baseline: context tokens ride along every step at their own noise level t_c
                ctx = [self.context_latents[s] for s in range(run.start)]
                full = torch.cat(ctx + [x], dim=1)
                n_ctx = q_offset
                per_token = torch.full((layout.num_tokens,), host_timesteps[i])
                per_token[:n_ctx] = t_c
                flow = self._forward(full, per_token, run.end, 0, list(range(run.end)), None, recorder)
                flow = flow[:, full.shape[1] - x.shape[1]:]
            sigma = host_timesteps[i] / T
            x0 = x.float() - sigma * flow  # clean estimate (flow matching: x_t = (1 - s) x0 + s noise)
            x = scheduler.step(flow.to(x.dtype), t, x, return_dict=False)[0]
            if self.on_step is not None:
                self.on_step(StepInfo(run=run, step=i + 1, total=steps, x0=x0, density=recorder.last_density))
        if self.parallel is not None:
            recorder.merge(self.parallel)
        if kv is not None and context_after:
            kv.close_hole()
            kv.invalidate(q_offset)  # the run's positions now hold live K/V, not a context pass
        self.attn_flops_moc += recorder.total_flops_moc
        self.attn_flops_dense += recorder.total_flops_dense
        out, f0 = {}, 0
        for s in run.shots:
            f = self.shot_frames[s]
            out[s] = x[:, f0:f0 + f].float().cpu()
            f0 += f
        return out, recorder, time.perf_counter() - started


__all__ = ["StorySampler", "SamplerOptions", "Run", "StepInfo"]
