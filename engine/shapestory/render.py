"""ShapeStory pixels: ground truth -> frames, batched in torch (CPU or GPU, no files).

For: `story_frames(spec)` (every frame of a story, (S, F, H, W, 3) uint8) and the batched path
the trainer uses, `frame_params` + `draw` (thousands of frames per call on the GPU). Shapes are
signed-distance fields with a one-pixel antialiased edge; backgrounds are a flat world colour
with optional stripes or dots (twice as large in close-ups).
Not for: the story rules (world.py) or detection (score.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .world import CLOSE_UP_SCALE, COLOURS, PATTERNS, SHAPES, WORLDS, StorySpec, track

STRIPE_PERIOD = 18.0  # pixels at 128 px height, wide framing
DOT_PERIOD, DOT_RADIUS = 20.0, 3.0
SLOTS = 3  # characters per frame at most


@dataclass
class FrameParams:
    """Everything `draw` needs, one row per frame (n frames)."""
    background: torch.Tensor  # (n, 3) float RGB 0..255
    pattern_colour: torch.Tensor  # (n, 3)
    pattern: torch.Tensor  # (n,) int64 index into PATTERNS
    pattern_scale: torch.Tensor  # (n,) float, 1 wide, CLOSE_UP_SCALE close-up
    centre: torch.Tensor  # (n, SLOTS, 2) float pixels (x, y)
    radius: torch.Tensor  # (n, SLOTS) float pixels, 0 = empty slot
    shape: torch.Tensor  # (n, SLOTS) int64 index into SHAPES
    colour: torch.Tensor  # (n, SLOTS, 3) float RGB

    @staticmethod
    def cat(parts: list["FrameParams"]) -> "FrameParams":
        return FrameParams(*(torch.cat([getattr(p, f) for p in parts]) for f in FrameParams.__dataclass_fields__))


def frame_params(spec: StorySpec, height: int = 128, width: int = 192) -> FrameParams:
    """Parameters of every frame of the story, shots in order ((S * F) rows)."""
    rows = []
    bg, pc, _ = WORLDS[spec.world]
    for s, shot in enumerate(spec.shots):
        scale = CLOSE_UP_SCALE if shot.framing == "close" else 1.0
        for placed in track(spec, s, height, width):
            slots = [(p.cx, p.cy, p.radius, SHAPES.index(p.shape), COLOURS[p.colour]) for p in placed]
            slots += [(0.0, 0.0, 0.0, 0, (0, 0, 0))] * (SLOTS - len(slots))
            rows.append((slots, scale))
    n = len(rows)
    return FrameParams(
        background=torch.tensor([bg] * n, dtype=torch.float32),
        pattern_colour=torch.tensor([pc] * n, dtype=torch.float32),
        pattern=torch.full((n,), PATTERNS.index(spec.pattern), dtype=torch.int64),
        pattern_scale=torch.tensor([r[1] for r in rows], dtype=torch.float32),
        centre=torch.tensor([[(x, y) for x, y, *_ in r[0]] for r in rows], dtype=torch.float32),
        radius=torch.tensor([[sl[2] for sl in r[0]] for r in rows], dtype=torch.float32),
        shape=torch.tensor([[sl[3] for sl in r[0]] for r in rows], dtype=torch.int64),
        colour=torch.tensor([[sl[4] for sl in r[0]] for r in rows], dtype=torch.float32),
    )


def _shape_distance(px: torch.Tensor, py: torch.Tensor, radius: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """Signed distance (pixels, < 0 inside) to each shape; px, py (n, SLOTS, H, W) relative to the centre."""
    r = radius[..., None, None]
    circle = torch.sqrt(px * px + py * py) - r
    square = torch.maximum(px.abs(), py.abs()) - 0.88 * r
    diamond = (px.abs() + py.abs() - 1.25 * r) * 0.7071
    R = 1.3 * r  # triangle circumradius; apex up (image y grows downward), centroid at the centre
    tri = torch.maximum(torch.maximum(py, -0.866 * px - 0.5 * py), 0.866 * px - 0.5 * py) - 0.5 * R
    d = torch.stack([circle, square, tri, diamond], dim=-1)  # (n, SLOTS, H, W, 4)
    return d.gather(-1, shape[..., None, None, None].expand(*px.shape, 1)).squeeze(-1)


def _on(p: FrameParams, height: int, width: int, device) -> tuple[FrameParams, torch.Tensor, torch.Tensor]:
    """p on `device` and the pixel centres' (Y, X) grids (H, W)."""
    dev = torch.device(device)
    p = FrameParams(*(getattr(p, f).to(dev) for f in FrameParams.__dataclass_fields__))
    ys = torch.arange(height, device=dev, dtype=torch.float32) + 0.5
    xs = torch.arange(width, device=dev, dtype=torch.float32) + 0.5
    Y, X = torch.meshgrid(ys, xs, indexing="ij")
    return p, Y, X


def _character_alpha(p: FrameParams, Y: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """Each slot's antialiased coverage (n, SLOTS, H, W) in [0, 1], before slots cover each other."""
    px = X[None, None] - p.centre[..., 0, None, None]
    py = Y[None, None] - p.centre[..., 1, None, None]
    return (0.5 - _shape_distance(px, py, p.radius, p.shape)).clamp(0, 1) * (p.radius > 0)[..., None, None]


def draw(p: FrameParams, height: int = 128, width: int = 192, device="cpu", with_mask: bool = False):
    """Frames (n, 3, H, W) float in [0, 1] on `device`; with_mask: also the characters' coverage
    (n, 1, H, W) in [0, 1] (the trainer weights its loss with it)."""
    p, Y, X = _on(p, height, width, device)
    s = (p.pattern_scale * height / 128.0)[:, None, None]  # (n, 1, 1)
    # background pattern: a coverage in [0, 1] of the pattern colour
    u = (X + Y)[None] / (STRIPE_PERIOD * s)
    stripes = ((u - torch.floor(u) - 0.5).abs() * STRIPE_PERIOD * s - 0.25 * STRIPE_PERIOD * s).clamp(-0.5, 0.5) + 0.5
    gx = X[None] / (DOT_PERIOD * s)
    gy = Y[None] / (DOT_PERIOD * s)
    dx = (gx - torch.floor(gx) - 0.5) * DOT_PERIOD * s
    dy = (gy - torch.floor(gy) - 0.5) * DOT_PERIOD * s
    dots = (DOT_RADIUS * s + 0.5 - torch.sqrt(dx * dx + dy * dy)).clamp(0, 1)
    zero = torch.zeros_like(dots)
    cover = torch.stack([zero, stripes, dots], 0).gather(0, p.pattern[None, :, None, None].expand(1, *dots.shape))[0]
    img = p.background[:, :, None, None] * (1 - cover[:, None]) + p.pattern_colour[:, :, None, None] * cover[:, None]
    # characters in slot order (later slots drawn on top)
    alpha = _character_alpha(p, Y, X)
    for k in range(p.radius.shape[1]):
        a = alpha[:, k, None]
        img = img * (1 - a) + p.colour[:, k, :, None, None] * a
    if with_mask:
        return img / 255.0, alpha.amax(dim=1, keepdim=True)
    return img / 255.0


def look_labels(p: FrameParams, cell: int, height: int = 128, width: int = 192, device="cpu",
                min_cover: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """What each `cell` x `cell` pixel block of every frame shows, for the trainer's look probe:
    (shape (n, H/cell, W/cell) int64: 0 background, 1 + the SHAPES index of the character that
    covers most of the block when it covers at least `min_cover` of it; colour (n, H/cell, W/cell, 3)
    float in [0, 1]: that character's RGB, zeros on background blocks). Later slots are drawn on
    top, so a block's character is the one whose visible coverage is largest."""
    if height % cell or width % cell:
        raise ValueError(f"cell {cell} must divide the frame size {height} x {width}")
    p, Y, X = _on(p, height, width, device)
    alpha = _character_alpha(p, Y, X)
    visible, above = torch.empty_like(alpha), torch.zeros_like(alpha[:, 0])
    for k in reversed(range(alpha.shape[1])):  # what later (upper) slots leave of slot k
        visible[:, k] = alpha[:, k] * (1 - above)
        above = above + visible[:, k]
    cover = torch.nn.functional.avg_pool2d(visible, cell)  # (n, SLOTS, H/cell, W/cell)
    best, slot = cover.max(dim=1)
    present = best >= min_cover
    shape = torch.where(present, p.shape.gather(1, slot.flatten(1)).view_as(slot) + 1, torch.zeros_like(slot))
    colour = p.colour[torch.arange(slot.shape[0], device=slot.device)[:, None, None], slot] / 255.0
    return shape, colour * present[..., None]


def story_frames(spec: StorySpec, height: int = 128, width: int = 192, device="cpu") -> torch.Tensor:
    """Every frame of the story: (S, F, H, W, 3) uint8 on the CPU."""
    x = draw(frame_params(spec, height, width), height, width, device)  # (S*F, 3, H, W)
    x = (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()
    return x.reshape(len(spec.shots), spec.frames, height, width, 3)


__all__ = ["FrameParams", "frame_params", "draw", "look_labels", "story_frames"]
