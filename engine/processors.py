"""Attention processors that put MoC into diffusers' Wan blocks.

For: `MoCSelfAttention` (attn1: projections, RoPE, then `story_attention`, the one place where
self-attention is computed: routing + moc_attention, or dense SDPA when MoC is off) and
`ShotCrossAttention` (attn2: each shot's video tokens attend to the global caption and their own
shot's caption only). The engine describes the current forward in a `ForwardPlan` and hands it
to every processor explicitly before the forward (backbone.StoryTransformer does this).
Not for: owning weights (the diffusers modules do), deciding layouts (engine.py) or the MoC
routing rules (engine/moc).

Shapes: B batch (2 with guidance: conditional, unconditional), N live (query) tokens of this
forward, K keys of the layout (context + live), H heads, D head dim, L text tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from engine.context_cache import ContextKV
from engine.parallel import SequenceParallel
from engine.moc import ATTENTION_RANGE, MoCConfig, TokenLayout, attend, dense_attention


@dataclass
class SelfAttentionPlan:
    layout: TokenLayout  # every token the keys cover, in story order (context shots, then live)
    q_offset: int  # the live (query) tokens are layout tokens [q_offset, q_offset + N)
    moc: MoCConfig | None  # routing config; None = dense attention
    backend: str = "auto"  # moc_attention backend
    kv: ContextKV | None = None  # context K/V cache; None = keys are exactly the live tokens
    recorder: "object | None" = None  # routing_report.RoutingRecorder (or None: record nothing)
    training: bool = False  # routing drop-off / drop-in
    generator: torch.Generator | None = None  # randomness of drop-off / drop-in
    parallel: SequenceParallel | None = None  # sequence parallelism: tokens sharded over ranks; None = one process
    parallel_tokens: int = 0  # with `parallel`: the forward's live tokens N (each rank holds a slice; set by
    #                           backbone.StoryTransformer.forward)
    route_tap: "object | None" = None  # training: called as route_tap(layer, q, k) with what routing scores,
    #                                    (B, H, N, D) with gradients (training.RouteProbe); None: nothing


@dataclass
class CrossAttentionPlan:
    shot_ranges: tuple[tuple[int, int, int], ...]  # (start, end, shot) of live tokens, in order
    text_index: dict[int, torch.Tensor]  # shot -> (Ls,) int64 text positions it sees (global + own)
    text_valid: torch.Tensor | None = None  # (B, L) bool, False on padding; None = no padding


@dataclass
class ForwardPlan:
    self_attn: SelfAttentionPlan
    cross_attn: CrossAttentionPlan
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None  # (1, N, 1, D) cos, sin of the live tokens


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved rotary embedding: x (B, N, H, D), cos/sin (1, N, 1, D)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # (B, N, H, D/2) even and odd channels
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def story_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: SelfAttentionPlan,
                    layer: int, q_route: torch.Tensor | None = None,
                    k_route: torch.Tensor | None = None) -> torch.Tensor:
    """The single self-attention call site. q, k, v (B, N, H, D) live tokens -> (B, N, H, D).
    q_route/k_route (B, N, H, D), when given, are what routing scores instead of q/k (pre-RoPE
    routing, MoCConfig.descriptor_rope=False).
    With plan.parallel (sequence parallelism) the inputs are this rank's slice of the tokens
    (B, N_local, H, D): an all-to-all gives every token of this rank's H / world heads, routing and
    attention run on those heads unchanged (MoC routes per head), and an all-to-all gives back
    this rank's tokens with every head."""
    sp = plan.parallel
    if sp is None:
        return _attention(q, k, v, plan, layer, q_route, k_route)
    n = plan.parallel_tokens
    q, k, v, q_route, k_route = (None if t is None else sp.to_heads(t, n) for t in (q, k, v, q_route, k_route))
    return sp.to_tokens(_attention(q, k, v, plan, layer, q_route, k_route))  # (B, N_local, H, D)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: SelfAttentionPlan, layer: int,
               q_route: torch.Tensor | None, k_route: torch.Tensor | None) -> torch.Tensor:
    """story_attention on whole tokens: q, k, v (B, N, H, D) -> (B, N, H, D)."""
    timing = started = None
    if plan.recorder is not None and q.is_cuda:  # attention time on the GPU, read back with the statistics
        timing = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        timing[0].record()
    elif plan.recorder is not None:
        started = time.perf_counter()
    n = q.shape[1]
    end = plan.layout.num_tokens
    if plan.kv is not None:
        k_all, v_all = plan.kv.update(layer, plan.q_offset, k, v, end, k_route)  # (B, H, K, D) views
        kr_all = None if k_route is None else plan.kv.routing_keys(layer, end)
    else:
        if plan.q_offset != 0 or n != end:
            raise ValueError(f"without a context K/V cache the queries must be the whole layout "
                             f"({end} tokens), got {n} at offset {plan.q_offset}")
        k_all, v_all = k.transpose(1, 2), v.transpose(1, 2)
        kr_all = None if k_route is None else k_route.transpose(1, 2)
    qh = q.transpose(1, 2)  # (B, H, N, D)
    D = qh.shape[-1]
    if plan.moc is None:
        with record_function(ATTENTION_RANGE):
            out = dense_attention(qh, k_all, v_all)
        _stop_clock(plan, timing, started)
        if plan.recorder is not None:
            plan.recorder.record_dense(layer, qh.shape, k_all.shape[2], plan.q_offset)
    else:
        q_r = None if q_route is None else q_route.transpose(1, 2)
        if plan.route_tap is not None:
            plan.route_tap(layer, qh if q_r is None else q_r, k_all if kr_all is None else kr_all)
        with record_function(ATTENTION_RANGE):  # routing inside it is its own range (moc.ROUTING_RANGE)
            out, selection = attend(qh, k_all, v_all, plan.layout, plan.moc, backend=plan.backend,
                                    q_offset=plan.q_offset, training=plan.training, generator=plan.generator,
                                    q_route=q_r, k_route=kr_all)
        _stop_clock(plan, timing, started)
        if plan.recorder is not None and selection is None:  # "auto" judged dense SDPA faster here
            plan.recorder.record_dense(layer, qh.shape, k_all.shape[2], plan.q_offset, backend="dense-auto")
        elif plan.recorder is not None:
            plan.recorder.record(layer, selection, D)
    return out.transpose(1, 2)  # (B, N, H, D)


def _stop_clock(plan: SelfAttentionPlan, timing, started: float | None) -> None:
    """Attention time of one call for the recorder, taken before the recorder's own reductions:
    an end event on the GPU (read back with the statistics), else the wall time since `started`."""
    if timing is not None:
        timing[1].record()
        plan.recorder.add_events(*timing)
    elif started is not None:
        plan.recorder.add_seconds(time.perf_counter() - started)


class _PlannedProcessor:
    """Holds the ForwardPlan the engine sets before a forward (cleared after it)."""

    def __init__(self):
        self.plan: ForwardPlan | None = None

    def _plan(self) -> ForwardPlan:
        if self.plan is None:
            raise RuntimeError(f"{type(self).__name__} has no ForwardPlan: run the model through "
                               "backbone.StoryTransformer.forward, which sets it")
        return self.plan


class MoCSelfAttention(_PlannedProcessor):
    """attn1 of block `layer`: Wan's projections, q/k RMSNorm and RoPE, then story_attention."""

    def __init__(self, layer: int):
        super().__init__()
        self.layer = layer

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, rotary_emb=None) -> torch.Tensor:
        # 1. projections, q/k RMSNorm, RoPE: plain tensor math (what torch.compile may fuse)
        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        # under autocast the RMSNorms return float32 while v is bf16: attention takes one dtype
        q, k = attn.norm_q(q).to(v.dtype), attn.norm_k(k).to(v.dtype)
        q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))  # (B, N, H, D)
        q_rope, k_rope = (apply_rope(q, *rotary_emb), apply_rope(k, *rotary_emb)) if rotary_emb is not None else (q, k)
        # 2. routing and attention, as the plan says
        out = self._attend(q, k, q_rope, k_rope, v)  # (B, N, H, D)
        out = out.flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))

    @torch.compiler.disable
    def _attend(self, q, k, q_rope, k_rope, v) -> torch.Tensor:
        """Everything that reads the plan, kept out of torch.compile (StoryTransformer.compile_blocks):
        a compiled graph would guard on a plan that changes every forward, and the MoC backends
        run their own kernels."""
        plan = self._plan()
        moc = plan.self_attn.moc
        q_route, k_route = (q, k) if moc is not None and not moc.descriptor_rope else (None, None)
        return story_attention(q_rope, k_rope, v, plan.self_attn, self.layer, q_route, k_route)


class ShotCrossAttention(_PlannedProcessor):
    """attn2: the video tokens of shot s attend to text positions plan.text_index[s] only."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask=None, rotary_emb=None) -> torch.Tensor:
        if attn.add_k_proj is not None:
            raise ValueError("image-conditioned Wan checkpoints (I2V) are not supported; use a T2V checkpoint")
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1)).transpose(1, 2)  # (B, H, N, D)
        k = attn.norm_k(attn.to_k(encoder_hidden_states)).unflatten(2, (attn.heads, -1)).transpose(1, 2)  # (B, H, L, D)
        v = attn.to_v(encoder_hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        q, k = q.to(v.dtype), k.to(v.dtype)  # autocast: the norms return float32, v is bf16
        out = self._attend(q, k, v)
        out = out.transpose(1, 2).flatten(2, 3).type_as(q)  # (B, N, H*D)
        return attn.to_out[1](attn.to_out[0](out))

    @torch.compiler.disable
    def _attend(self, q, k, v) -> torch.Tensor:
        """Each shot's rows over its text positions, as the plan says (kept out of torch.compile,
        like MoCSelfAttention._attend). q (B, H, N, D), k, v (B, H, L, D) -> (B, H, N, D)."""
        plan = self._plan().cross_attn
        out = torch.zeros_like(q)  # zeros: rows of no shot (a sequence-parallel slice's padding) stay finite
        for start, end, shot in plan.shot_ranges:
            idx = plan.text_index[shot].to(k.device)
            mask = None
            if plan.text_valid is not None:
                mask = plan.text_valid[:, idx].to(q.device)[:, None, None, :]  # (B, 1, 1, Ls)
            out[:, :, start:end] = F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, idx], v[:, :, idx],
                                                                  attn_mask=mask)
        return out


__all__ = ["SelfAttentionPlan", "CrossAttentionPlan", "ForwardPlan", "MoCSelfAttention",
           "ShotCrossAttention", "story_attention", "apply_rope"]
