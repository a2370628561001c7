"""The backbone: diffusers' WanTransformer3DModel with MoC processors, run over part of a story.

For: installing the processors (`StoryTransformer(model)`), the forward over the live shots of a
story (`forward`: patchify, per-token or per-batch timesteps, Wan's blocks unchanged, unpatchify)
with RoPE positions taken from the whole story (a shot generated after its context keeps its
true frame positions), and `make_cross_plan` (which text each shot sees). Under sequence
parallelism (ForwardPlan.self_attn.parallel) each rank runs the blocks on its slice of the tokens
(`local_plan`) and every rank gets the whole output (engine/parallel.py).
Not for: weights (the diffusers model owns them), sampling (sampler.py) or routing (engine/moc).

Why a forward of our own: diffusers' `WanTransformer3DModel.forward` numbers RoPE frames from 0
for whatever it is given; shot-by-shot sampling feeds one shot whose frames sit later in the
story. Everything else is the diffusers code path: the same submodules in the same order.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from engine.parallel import SequenceParallel
from engine.processors import CrossAttentionPlan, ForwardPlan, MoCSelfAttention, ShotCrossAttention


class StoryTransformer:
    def __init__(self, model):
        self.model = model  # diffusers WanTransformer3DModel (owns the weights)
        self.self_processors = []
        self.cross_processors = []
        for layer, block in enumerate(model.blocks):
            p1, p2 = MoCSelfAttention(layer), ShotCrossAttention()
            block.attn1.set_processor(p1)
            block.attn2.set_processor(p2)
            self.self_processors.append(p1)
            self.cross_processors.append(p2)

    def compile_blocks(self) -> None:
        """torch.compile each Wan block (dynamic shapes): its norms, modulation, projections, RoPE
        and feed-forward fuse into fewer kernels. The processors' `_attend` methods (routing,
        attention, the plan) stay eager behind graph breaks, so one compiled block serves every
        story shape and plan. Used by the trainer (TrainerConfig.compile) and, with `launch.py
        --compile`, by sampling."""
        for block in self.model.blocks:
            block.compile(dynamic=True)

    # ---- sizes --------------------------------------------------------------------------------

    @property
    def config(self):
        return self.model.config

    @property
    def num_layers(self) -> int:
        return len(self.model.blocks)

    @property
    def num_heads(self) -> int:
        return self.model.config.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.model.config.attention_head_dim

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(self.model.config.patch_size)

    def frame_tokens(self, latent_h: int, latent_w: int) -> int:
        _, ph, pw = self.patch_size
        return (latent_h // ph) * (latent_w // pw)

    # ---- positions ----------------------------------------------------------------------------

    def rotary(self, frame_start: int, frames: int, latent_h: int, latent_w: int, device,
               dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) (1, N, 1, D) for `frames` latent frames starting at story frame `frame_start`."""
        pt, ph, pw = self.patch_size
        total = (frame_start + frames) * pt
        if total // pt > self.model.rope.max_seq_len:
            raise ValueError(f"the story has {total // pt} latent frames but the model's RoPE covers "
                             f"{self.model.rope.max_seq_len}")
        shape_only = torch.empty(1, 1, total, latent_h, latent_w, device="meta")
        cos, sin = self.model.rope(shape_only)  # (1, F*h*w, 1, D) for frames [0, total)
        per_frame = (latent_h // ph) * (latent_w // pw)
        sl = slice(frame_start * per_frame, (frame_start + frames) * per_frame)
        return cos[:, sl].to(device=device, dtype=dtype), sin[:, sl].to(device=device, dtype=dtype)

    # ---- forward ------------------------------------------------------------------------------

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                plan: ForwardPlan) -> torch.Tensor:
        """latents (B, C, F, h, w) of the live shots; timestep (B,) or (B, N) per token; text
        (B, L, text_dim) raw text-encoder states. Returns the flow prediction (B, C, F, h, w)."""
        m = self.model
        B, _, Fr, h, w = latents.shape
        pt, ph, pw = self.patch_size
        N = (Fr // pt) * (h // ph) * (w // pw)
        if plan.rotary is None:
            raise ValueError("ForwardPlan.rotary must hold the live tokens' RoPE (StoryTransformer.rotary)")
        if timestep.ndim == 2 and timestep.shape[1] != N:
            raise ValueError(f"per-token timestep must be (B, {N}), got {tuple(timestep.shape)}")
        sp = plan.self_attn.parallel
        if sp is not None:  # sequence parallelism: this rank runs the blocks on its slice of the tokens
            if torch.is_grad_enabled():
                raise ValueError("sequence parallelism is inference only: run the forward under torch.no_grad()")
            plan = local_plan(plan, N, sp)
            if timestep.ndim == 2:
                timestep = sp.split_tokens(timestep, dim=1)
        for p in self.self_processors + self.cross_processors:
            p.plan = plan
        try:
            # 1. patchify: (B, C, F, h, w) -> (B, N, dim), tokens frame-major (with sp: (B, N_local, dim))
            x = m.patch_embedding(latents).flatten(2).transpose(1, 2).contiguous()
            if sp is not None:
                x = sp.split_tokens(x)
            # 2. time and text conditioning; a (B, N) timestep gives every token its own noise level
            ts_len = None
            if timestep.ndim == 2:
                ts_len, timestep = timestep.shape[1], timestep.flatten()
            temb, timestep_proj, text_states, _ = m.condition_embedder(timestep, text, None, timestep_seq_len=ts_len)
            timestep_proj = timestep_proj.unflatten(2 if ts_len else 1, (6, -1))  # (B, [N,] 6, dim)
            # 3. Wan's blocks, unchanged; the processors read the plan
            rotary = plan.rotary
            for block in m.blocks:
                if torch.is_grad_enabled() and m.gradient_checkpointing:
                    x = m._gradient_checkpointing_func(block, x, text_states, timestep_proj, rotary)
                else:
                    x = block(x, text_states, timestep_proj, rotary)
            # 4. output norm, projection and unpatchify (as diffusers does)
            if temb.ndim == 3:
                shift, scale = (m.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)
                shift, scale = shift.squeeze(2), scale.squeeze(2)
            else:
                shift, scale = (m.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
            x = (m.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
            x = m.proj_out(x)
            if sp is not None:
                x = sp.gather_tokens(x, N)  # (B, N, out): every rank gets the whole prediction
            x = x.reshape(B, Fr // pt, h // ph, w // pw, pt, ph, pw, -1)
            x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
            return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)  # (B, C, F, h, w)
        finally:
            for p in self.self_processors + self.cross_processors:
                p.plan = None


def local_plan(plan: ForwardPlan, num_tokens: int, sp: SequenceParallel) -> ForwardPlan:
    """The plan of rank sp.rank's slice of the live tokens: its RoPE rows, its part of each shot's
    range (cross-attention), and the whole forward's token count (for the all-to-all)."""
    lo, hi = sp.token_range(num_tokens)
    ranges = tuple((max(a, lo) - lo, min(b, hi) - lo, shot) for a, b, shot in plan.cross_attn.shot_ranges
                   if max(a, lo) < min(b, hi))
    cos, sin = plan.rotary
    return replace(plan, self_attn=replace(plan.self_attn, parallel_tokens=num_tokens),
                   cross_attn=replace(plan.cross_attn, shot_ranges=ranges),
                   rotary=(sp.split_tokens(cos), sp.split_tokens(sin)))


def make_cross_plan(segments: list[list[torch.Tensor]], live_shots: list[tuple[int, int, int]],
                    device) -> tuple[torch.Tensor, CrossAttentionPlan]:
    """Pack text for cross-attention.

    segments[b][0] is sample b's global caption (L, D), segments[b][1 + s] the caption of shot s.
    Each segment gets one slot as long as its longest sample; shorter samples are padded and
    masked. live_shots: (start, end, shot) token ranges of this forward.
    Returns text (B, L, D) and the plan (which positions each shot sees)."""
    B = len(segments)
    n_seg = len(segments[0])
    D = segments[0][0].shape[-1]
    slot_len = [max(segments[b][j].shape[0] for b in range(B)) for j in range(n_seg)]
    offsets = [0]
    for n in slot_len:
        offsets.append(offsets[-1] + n)
    L = offsets[-1]
    # pinned on the way to a GPU: its copy there then need not wait for the kernels queued before it
    pinned = torch.device(device).type == "cuda"
    text = torch.zeros(B, L, D, dtype=segments[0][0].dtype, pin_memory=pinned)
    valid = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        for j in range(n_seg):
            seg = segments[b][j]
            text[b, offsets[j]:offsets[j] + seg.shape[0]] = seg
            valid[b, offsets[j]:offsets[j] + seg.shape[0]] = True
    shots = [shot for _, _, shot in live_shots]
    rows = [list(range(offsets[0], offsets[1])) + list(range(offsets[1 + s], offsets[2 + s])) for s in shots]
    # on the device in one copy: the processors index with them in every layer
    flat = torch.tensor([i for row in rows for i in row], dtype=torch.long).to(device)
    text_index = dict(zip(shots, flat.split([len(row) for row in rows])))
    plan = CrossAttentionPlan(shot_ranges=tuple(live_shots), text_index=text_index,
                              text_valid=None if bool(valid.all()) else valid.to(device))
    return text.to(device, non_blocking=pinned), plan


__all__ = ["StoryTransformer", "make_cross_plan", "local_plan"]
