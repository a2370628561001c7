"""One training step of the story model: flow matching with per-shot noise levels and MoC.

For: `training_loss(model, batch, config, generator)`, the loss the trainer (engine/trainer.py)
calls per batch: a batch is several stories that share one shot layout (same shot count and
frames per shot, different content and captions); every shot of every story draws its own noise
level (LCT: low-noise shots act as context for the others, which is what shot-by-shot sampling
and regeneration later rely on), tokens carry their shot's timestep (Wan's per-token timestep
input), and routing runs in training mode (context drop-off / drop-in).
Not for: data generation, optimisers, checkpoints (engine/trainer.py owns those).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from engine.backbone import make_cross_plan
from engine.moc import MoCConfig, TokenLayout
from engine.processors import ForwardPlan, SelfAttentionPlan


# backend "by-length": "gather" on stories of this many shots or more, the tile kernels ("triton")
# below. The training step on one H200 (benchmarks/results/train_step_gather_h200.json, 2026-12-07,
# forced links and their backward on cuDNN): 8 shots x 8 frames gather 154.4 ms against the 64-row
# tiles' 166.4 (203.0 against 265.4 with twice the stories); 4 shots 121.9 against 120.3; 2 shots
# 127.7 against 105.1.
GATHER_TRAIN_MIN_SHOTS = 6


def step_backend(backend: str, shots: int) -> str:
    """The moc_attention backend of one training step on stories of `shots` shots: `backend`, or
    for "by-length" the faster of "gather" and "triton" at that length (GATHER_TRAIN_MIN_SHOTS)."""
    if backend != "by-length":
        return backend
    return "gather" if shots >= GATHER_TRAIN_MIN_SHOTS else "triton"


@dataclass(frozen=True)
class TrainingConfig:
    moc: MoCConfig | None = MoCConfig()  # routing (drop_off / drop_in apply in training); None = dense
    backend: str = "reference"  # moc_attention backend (autograd-capable), or "by-length" (step_backend)
    chunking: str = "frame"  # TokenLayout chunking
    chunk_size: int = 0  # for "subframe" / "fixed"
    num_train_timesteps: int = 1000  # the scheduler's timestep scale
    shift: float = 3.0  # noise levels drawn as the sampler's shifted schedule spends its steps
    shared_sigma: float = 0.5  # probability that all shots of a story share one level (joint sampling)
    look_weight: float = 0.0  # weight of the look probe's loss (LookProbe; 0: no probe)
    route_weight: float = 0.0  # weight of the routing probe's loss (RouteProbe; 0: no probe)
    # a regeneration step (training_loss(open_shot=i)): the fixed shots' noise level, the sampler's
    # default context noise (Settings.context_noise), the level a regeneration's context is re-noised to
    context_sigma: float = 0.25


@dataclass
class StoryBatch:
    latents: torch.Tensor  # (B, C, F, h, w) clean latents, shots concatenated along frames
    shot_frames: tuple[int, ...]  # latent frames per shot, shared by the batch
    text: list[list[torch.Tensor]]  # per story: [global caption, caption of shot 0, ...] (L, text_dim)
    weights: torch.Tensor | None = None  # (B, F, h, w) >= 0 per latent cell: the loss's weights (None: uniform)
    # per token, what the clean frame shows there (the look probe's targets; shapestory.render.look_labels):
    # shape class (B, F, h/ph, w/pw) int64 (0 background) and the character's colour (..., 3) in [0, 1]
    look: tuple[torch.Tensor, torch.Tensor] | None = None


class LookProbe(torch.nn.Module):
    """A training-only head on block `layer`'s hidden states: each token's character shape (class 0
    background, 1 + a SHAPES index) and colour, from the noisy story and its captions.

    Why: the flow loss barely pays for a character's outline (a few dozen pixels of a frame), and
    the trained models took their colours from the captions but not their shapes (docs/training,
    run 8). At high noise the frames no longer show the shape, so the probe can only answer from
    the caption, or from the earlier shots where the character was described: its loss asks the
    blocks below it to carry exactly that to the character's tokens. It reads the features and
    leaves the flow's target as it is (unlike a pixel weight on the flow loss, which biased the
    samples: runs 1 and 2). The exported model does not include it."""

    def __init__(self, dim: int, layer: int, classes: int = 5, character_weight: float = 4.0):
        super().__init__()
        self.layer = layer
        self.classes = classes
        self.character_weight = character_weight  # extra weight of character tokens (about 1 in 15 of a frame)
        self.norm = torch.nn.LayerNorm(dim, elementwise_affine=False)
        self.head = torch.nn.Linear(dim, classes + 3)
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None  # (shape CE, colour MSE), detached

    def loss(self, hidden: torch.Tensor, look: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """hidden (B, N, dim); look as StoryBatch.look, N = its frames x token rows x columns."""
        shape, colour = look
        B, N = hidden.shape[:2]
        shape = shape.reshape(B, -1).to(hidden.device)
        colour = colour.reshape(B, -1, 3).to(hidden.device, torch.float32)
        if shape.shape[1] != N:
            raise ValueError(f"look labels cover {shape.shape[1]} tokens a story, the hidden states {N}")
        out = self.head(self.norm(hidden.float()))
        ce = torch.nn.functional.cross_entropy(out[..., :self.classes].flatten(0, 1), shape.flatten(), reduction="none")
        character = (shape > 0).float()
        w = 1 + self.character_weight * character.flatten()
        ce = (ce * w).sum() / w.sum()
        rgb = torch.sigmoid(out[..., self.classes:])
        mse = (((rgb - colour) ** 2).sum(-1) * character).sum() / (3 * character.sum()).clamp_min(1)
        self.last = (ce.detach(), mse.detach())
        return ce + mse


def character_ids(look: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """(B, N) int64 per token: 0 on background, else one id per look (shape class and colour, the
    colour's channels on 8 levels): the tokens of one character share it, and so do two characters
    drawn alike. look as StoryBatch.look."""
    shape, colour = look
    B = shape.shape[0]
    shape = shape.reshape(B, -1)
    levels = (colour.reshape(B, -1, 3).float().clamp(0, 1) * 7).round().long()  # (B, N, 3) in 0..7
    rgb = levels[..., 0] * 64 + levels[..., 1] * 8 + levels[..., 2]
    return torch.where(shape > 0, 1 + (shape - 1) * 512 + rgb, 0)


ROUTE_IDS = 1 + 8 * 512  # character_ids' range (shape classes up to 8, 512 colours), 0 the background


def route_targets(ids: torch.Tensor, layout: TokenLayout, moc: MoCConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """For each token, the key chunks routing may pick for it that show what it should recall.
    ids (B, N) as character_ids. A character's token: the chunks showing the same character. A
    background token: the chunks showing any character of its own shot (the quality benchmark's
    "routing follows the story" counts every token of a shot). Returns (positive (B, N, C) bool,
    allowed (N, C) bool): allowed are the chunks top-k chooses among (MoC's candidate links: earlier
    chunks outside the own shot), positive a subset of them, empty where nothing earlier shows the
    character (its first appearance). No host synchronisation."""
    from engine.moc.routing import links_on
    B, N = ids.shape
    if N != layout.num_tokens:
        raise ValueError(f"character ids cover {N} tokens a story, the layout {layout.num_tokens}")
    if ids.dtype != torch.int64:
        raise ValueError(f"ids must be int64 (character_ids), got {ids.dtype}")
    device = ids.device
    lt = layout.tensors_on(device)
    C = layout.num_chunks
    S = layout.num_shots
    ids = ids.clamp(0, ROUTE_IDS - 1)
    b = torch.arange(B, device=device)[:, None].expand(B, N)
    has = torch.zeros(B, ROUTE_IDS, C, dtype=torch.bool, device=device)  # does chunk c show id i
    has[b, ids, lt.token_chunk[None, :].expand(B, N)] = True
    has[:, 0] = False  # background is no character
    token_shot = lt.chunk_shot[lt.token_chunk].clamp_min(0)  # (N,) video tokens only in training layouts
    in_shot = torch.zeros(B, S, ROUTE_IDS, device=device)  # does shot s show id i
    in_shot[b, token_shot[None, :].expand(B, N), ids] = 1.0
    in_shot[:, :, 0] = 0.0
    shot_sees = torch.bmm(in_shot, has.float()) > 0  # (B, S, C): chunk c shows a character of shot s
    _, cand = links_on(layout, moc, device)
    allowed = cand[lt.token_chunk]  # (N, C)
    own = has.gather(1, ids[:, :, None].expand(B, N, C))  # (B, N, C): chunk shows the token's character
    shot = shot_sees.gather(1, token_shot[None, :, None].expand(B, N, C))  # (B, N, C)
    positive = torch.where((ids > 0)[:, :, None], own, shot) & allowed[None]
    return positive, allowed


class RouteProbe:
    """A training-only loss on MoC's routing scores: a token should score the earlier chunks that
    show its character (a background token: its shot's characters) above the other candidates.

    Why: after 102 minutes of training (runs 2 to 12) the routing followed the story at 1.11x chance
    (the quality benchmark's share of picks into shots showing the named character), and no run
    moved it: the flow loss never asks a query to find the chunks that hold its character, only to
    draw well with whatever top-k brought. Per layer in `layers` (None: every layer), the scores routing ranks
    (query . mean key of a chunk, per head, over the candidate chunks) are scaled by 1/sqrt(D) and
    put through a softmax; the loss is -log of the probability mass on the positive chunks
    (route_targets), averaged over heads and the tokens that have any, a character's tokens weighted
    1 + character_weight (they are about 1 in 15 of a frame, and theirs is the look to recall), a
    background token's background_weight (0: characters only; run 13's loss sat near its floor from
    the first step because most earlier frames show some character of a background token's shot). Top-k
    itself is not differentiated: the loss moves the scores it ranks. It has no parameters; the
    exported model is the transformer alone."""

    def __init__(self, layers: tuple[int, ...] | None = None, character_weight: float = 4.0,
                 background_weight: float = 1.0):
        if character_weight < -1 or background_weight < 0:
            raise ValueError(f"the routing probe's weights must be >= 0 (a character's: 1 + {character_weight}, "
                             f"a background token's: {background_weight})")
        self.layers = None if layers is None else tuple(layers)
        self.character_weight = character_weight
        self.background_weight = background_weight
        self.targets: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # positive, allowed, weight
        self.layout: TokenLayout | None = None
        self.losses: list[torch.Tensor] = []
        self.last: torch.Tensor | None = None  # the mean over layers of the last step, detached

    def start(self, ids: torch.Tensor, layout: TokenLayout, moc: MoCConfig) -> None:
        positive, allowed = route_targets(ids, layout, moc)
        per_token = torch.where(ids > 0, 1.0 + self.character_weight, self.background_weight)
        weight = positive.any(-1).float() * per_token  # (B, N); 0: no target
        self.targets = (positive, allowed, weight)
        self.layout = layout
        self.losses = []

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        """The route_tap of SelfAttentionPlan: q (B, H, N, D) queries, k (B, H, N, D) keys."""
        if self.targets is None or (self.layers is not None and layer not in self.layers):
            return
        from engine.moc.routing import chunk_descriptors
        positive, allowed, weight = self.targets
        desc = chunk_descriptors(k, self.layout)  # (B, H, C, D) float32, differentiable
        scores = torch.einsum("bhnd,bhcd->bhnc", q.float(), desc) * q.shape[-1] ** -0.5
        # masked with a finite floor, not -inf: a row with no candidate then has finite (zero) gradients
        every = torch.logsumexp(torch.where(allowed[None, None], scores, -1e4), dim=-1)
        good = torch.logsumexp(torch.where(positive[:, None], scores, -1e4), dim=-1)
        w = weight[:, None].expand_as(good)
        self.losses.append(((every - good) * w).sum() / w.sum().clamp_min(1))

    def loss(self) -> torch.Tensor:
        if not self.losses:
            raise RuntimeError("the routing probe saw no MoC layer: it needs MoC attention (config.moc) "
                               "and layers the model has")
        out = torch.stack(self.losses).mean()
        self.last = out.detach()
        self.targets, self.layout, self.losses = None, None, []
        return out


def regeneration_step(moc: MoCConfig, shots: int, open_shot: int, shot_sigmas: torch.Tensor,
                      context_sigma: float) -> tuple[MoCConfig, torch.Tensor]:
    """A both-sided regeneration of shot `open_shot` as a training step, set up as the sampler runs it
    (StorySampler.sample(context_after=True)): its queries may also route to the later shots
    (MoCConfig.open_shots), the later shots never see it (blocks: their context passes exclude the
    shot being regenerated), and every other shot is fixed context at `context_sigma`. Returns the
    routing config and the (B, S) noise levels (the open shot keeps its drawn level).

    Why: the models up to run 14 never routed to a later chunk in training, and regenerating a
    middle shot with both sides as context kept identity worse than with earlier shots only (run 14
    on 48 held-out stories, H200: 11 against 6 of 48 look-less appearances)."""
    if not 0 <= open_shot < shots - 1:
        raise ValueError(f"open_shot must be a shot with a later one, 0..{shots - 2} of {shots} shots, got {open_shot}")
    if moc is None:
        raise ValueError("a regeneration step (open_shot) needs MoC routing (TrainingConfig.moc)")
    blocks = tuple(sorted(set(moc.blocks) | {(j, open_shot) for j in range(open_shot + 1, shots)}))
    moc = replace(moc, open_shots=(open_shot,), blocks=blocks)
    is_open = torch.arange(shots, device=shot_sigmas.device) == open_shot
    return moc, torch.where(is_open[None, :], shot_sigmas, torch.full_like(shot_sigmas, context_sigma))


def draw_shot_sigmas(batch: int, shots: int, config: TrainingConfig,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, S) noise levels in (0, 1): u ~ U(0, 1) through the sampler's shift, per shot, or one
    per story with probability `shared_sigma`. On the generator's device (the CPU without one):
    drawing them never waits for the GPU."""
    device = None if generator is None else generator.device
    u = torch.rand(batch, shots, generator=generator, device=device)
    shared = torch.rand(batch, 1, generator=generator, device=device) < config.shared_sigma
    u = torch.where(shared, u[:, :1], u)
    s = config.shift
    return s * u / (1 + (s - 1) * u)


@functools.lru_cache(maxsize=256)
def step_layout(frame_tokens: int, shot_frames: tuple[int, ...], chunking: str, chunk_size: int) -> TokenLayout:
    """One TokenLayout object per story shape, kept across steps: what it memoises on the device
    (its tensors, the forced and candidate links, key blocks) is then copied there once per shape,
    not every step (a copy from pageable host memory waits for the GPU)."""
    return TokenLayout(frame_tokens, shot_frames, chunking=chunking, chunk_size=chunk_size)


def training_loss(model, batch: StoryBatch, config: TrainingConfig, generator: torch.Generator | None = None,
                  shot_sigmas: torch.Tensor | None = None, look_probe: LookProbe | None = None,
                  route_probe: RouteProbe | None = None, open_shot: int | None = None) -> torch.Tensor:
    """Flow-matching loss over a batch of stories. shot_sigmas (B, S) in [0, 1]: noise level per
    story and shot (default: `draw_shot_sigmas`). open_shot: train a both-sided regeneration of
    that shot instead (`regeneration_step`: it may route to later shots, the others are context).
    The generator (CPU or on the model's device) draws noise levels, noise and drop-off / drop-in.
    look_probe: with config.look_weight > 0, its loss on batch.look is added (the flow loss's target
    is unchanged). route_probe: with config.route_weight > 0 and MoC, its loss on the routing scores
    (targets from batch.look) is added too. Returns a scalar with gradients."""
    tr = model.transformer if hasattr(model, "transformer") else model
    device = next(tr.model.parameters()).device
    x0 = batch.latents.to(device, torch.float32)  # (B, C, F, h, w)
    B, C, F, h, w = x0.shape
    frames = tuple(batch.shot_frames)
    S = len(frames)
    if sum(frames) != F:
        raise ValueError(f"shot_frames {frames} add up to {sum(frames)} frames, latents hold {F}")
    if len(batch.text) != B or any(len(t) != S + 1 for t in batch.text):
        raise ValueError(f"text must hold, for each of the {B} stories, the global caption and {S} shot captions")
    if shot_sigmas is None:
        shot_sigmas = draw_shot_sigmas(B, S, config, generator)
    moc = config.moc
    if open_shot is not None:
        moc, shot_sigmas = regeneration_step(moc, S, open_shot, shot_sigmas, config.context_sigma)
    gen_device = torch.device("cpu") if generator is None else generator.device
    noise = torch.randn(x0.shape, generator=generator, device=gen_device).to(device)
    shot_sigmas = shot_sigmas.float().to(device)
    # per frame; built from the host's frame counts (repeat_interleave with a device tensor of
    # counts would wait for the GPU to learn its output size)
    sigma_f = torch.cat([shot_sigmas[:, i:i + 1].expand(B, f) for i, f in enumerate(frames)], dim=1)
    s = sigma_f[:, None, :, None, None]  # (B, 1, F, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    target = noise - x0  # the flow the model predicts
    layout = step_layout(tr.frame_tokens(h, w), frames, config.chunking, config.chunk_size)
    timestep = torch.repeat_interleave(sigma_f, layout.frame_tokens, dim=1) * config.num_train_timesteps  # (B, N)
    ranges = [(*layout.shot_range(i), i) for i in range(S)]
    text, cross = make_cross_plan(batch.text, ranges, device)
    routing = route_probe is not None and config.route_weight > 0
    if routing:
        if batch.look is None or moc is None:
            raise ValueError("the routing probe needs MoC attention and StoryBatch.look "
                             "(shapestory.render.look_labels per token)")
        route_probe.start(character_ids(batch.look).to(device), layout, moc)
    plan = ForwardPlan(
        self_attn=SelfAttentionPlan(layout=layout, q_offset=0, moc=moc, backend=step_backend(config.backend, S),
                                    training=True, generator=generator,
                                    route_tap=route_probe if routing else None),
        cross_attn=cross, rotary=tr.rotary(0, F, h, w, device))
    dtype = next(tr.model.parameters()).dtype
    probing = look_probe is not None and config.look_weight > 0
    hidden, hook = {}, None
    if probing:
        if batch.look is None:
            raise ValueError("the look probe needs StoryBatch.look (shapestory.render.look_labels per token)")
        if not 0 <= look_probe.layer < len(tr.model.blocks):
            raise ValueError(f"look probe layer {look_probe.layer} is not one of the model's {len(tr.model.blocks)} blocks")
        hook = tr.model.blocks[look_probe.layer].register_forward_hook(lambda _m, _i, out: hidden.__setitem__("x", out))
    try:
        flow = tr.forward(x_t.to(dtype), timestep, text.to(dtype), plan).float()
    finally:
        if hook is not None:
            hook.remove()
    probe = config.look_weight * look_probe.loss(hidden["x"], batch.look) if probing else 0.0
    if routing:
        probe = probe + config.route_weight * route_probe.loss()
    err = (flow - target) ** 2
    if batch.weights is None:
        return torch.mean(err) + probe
    if tuple(batch.weights.shape) != (B, F, h, w):
        raise ValueError(f"weights must be (B, F, h, w) = {(B, F, h, w)}, got {tuple(batch.weights.shape)}")
    cell = batch.weights.to(device, torch.float32)[:, None]  # (B, 1, F, h, w): a cell's channels share it
    return (err * cell).mean() / cell.mean().clamp_min(1e-8) + probe


__all__ = ["TrainingConfig", "StoryBatch", "LookProbe", "RouteProbe", "character_ids", "draw_shot_sigmas",
           "regeneration_step", "route_targets", "step_layout", "training_loss"]
