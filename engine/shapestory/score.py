"""ShapeStory scoring: frames -> what is on screen -> how well it follows the story (OpenCV, numpy).

For: `detect(frame, world, pattern)` (the characters in one RGB frame: palette colour, shape,
centroid, size), `score_shot(spec, shot, frames)` (per appearance: is the right look there, does
it move as the caption says; per shot: background, smoothness, extra characters) and
`score_story(spec, frames)` (the numbers the quality benchmark reports: adherence, identity,
background, smoothness). Generated frames are blurred, noisy, colour-shifted versions of the
renderer's look, so every test here is a nearest-prototype decision (nearest palette colour,
best-fitting shape template, nearest world) with tolerances derived from the world's constants,
never tuned on model outputs.
Not for: the story rules (world.py), pixels (render.py) or running a model (benchmarks/quality.py).

How a frame is read:
1. Colour: each pixel goes to the nearest of the 8 palette colours if that colour is nearer than
   the background (the segment between the world colour and its pattern colour, which also covers
   antialiased stripe edges) and within PALETTE_TOLERANCE.
2. Parts: per colour, connected components. Antialiased or blurred edges leave thin rings of
   in-between colours (red over yellow reads as orange); a component is kept only if enough of
   it survives a 3x3 opening, so rings go and small shapes stay.
3. Shape: the component's mask is compared with each shape's template (the renderer's signed
   distance fields, rebuilt here in numpy) placed at its centroid with the area it has; the best
   intersection-over-union wins. A component cut by the frame edge has a biased centroid and too
   small an area, so there each template is placed from the box sides the edge did not cut, then
   refined (centre and size) by a short coordinate search, the template clipped to the frame.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import cv2
import numpy as np

from .world import (ACTIONS, BOUNCE_Y, CLOSE_UP_SCALE, COLOURS, GROW, MOVE_X, MOVE_Y, PATTERNS, SHAPES, SHRINK, SIZES, WORLDS, StorySpec,
                    track)

# ---- tolerances (RGB distances on 0..255, fractions of the world's constants) --------------------

PALETTE_TOLERANCE = 64.0  # a pixel further than this from every palette colour is not a character
MIN_AREA_FRACTION = 0.35  # a part smaller than this share of the smallest character's area is noise
MIN_CORE_FRACTION = 0.25  # share of a part that must survive a 3x3 opening (kills antialias rings)
MIN_SHAPE_IOU = 0.5  # a part no template fits this well is not a character
WORLD_TOLERANCE = 60.0  # a background further than this from its world (and not nearest to it) is wrong
CONSISTENCY_TOLERANCE = 30.0  # shots' backgrounds further apart than this break the story
BACKGROUND_DIFF = 15.0  # mean |change| of background pixels between frames above this is a flicker
MOVE_FRACTION = 0.25  # a move must cover this share of the ground-truth travel
BOUNCE_FRACTION = 0.4  # a bounce must rise this share of BOUNCE_Y
STILL_FRACTION = 0.3  # a still character stays within this share of BOUNCE_Y of its median centre
GROW_RATIO, SHRINK_RATIO = 1.2, 0.83  # radius ratio (last third / first third) for grows / shrinks
STILL_RATIO = (0.85, 1.18)  # radius ratio range of a still character
JUMP_MARGIN = 0.05  # centroid jump allowance beyond the expected step, fraction of frame height
SIZE_RATIO = math.sqrt(SIZES["big"] / SIZES["small"])  # a look's size holds within this radius ratio:
# half the way (geometrically) from small to big, so a small character drawn big (or a blob of
# any size) is not the stated look

# template area per radius^2, matching the renderer's fields below
_AREA_PER_R2 = {"circle": math.pi, "square": (2 * 0.88) ** 2, "triangle": 3 * math.sqrt(3) / 4 * 1.3 ** 2,
                "diamond": 2 * 1.25 ** 2}
_EXTENT = {"circle": (1.0, 1.0, 1.0, 1.0), "square": (0.88, 0.88, 0.88, 0.88),  # left, up, right, down per r
           "triangle": (1.3 * 0.866, 1.3, 1.3 * 0.866, 0.65), "diamond": (1.25, 1.25, 1.25, 1.25)}
_PALETTE_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _PALETTE_NAMES], dtype=np.float32)  # (8, 3)


# ---- detection ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Detection:
    colour: str  # nearest palette colour name (a COLOURS key)
    shape: str  # one of SHAPES
    cx: float  # centroid, pixels (pixel centres at i + 0.5, like world.track)
    cy: float
    area: float  # pixels
    radius: float  # sqrt(area / pi), pixels (only used for trends: grows, shrinks)


def _shape_distance(shape: str, px: np.ndarray, py: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (< 0 inside), the numpy twin of render._shape_distance."""
    if shape == "circle":
        return np.sqrt(px * px + py * py) - r
    if shape == "square":
        return np.maximum(np.abs(px), np.abs(py)) - 0.88 * r
    if shape == "diamond":
        return (np.abs(px) + np.abs(py) - 1.25 * r) * 0.7071
    R = 1.3 * r  # triangle, apex up, centroid at the centre
    return np.maximum(np.maximum(py, -0.866 * px - 0.5 * py), 0.866 * px - 0.5 * py) - 0.5 * R


def _background_distance(img: np.ndarray, world: str, pattern: str) -> np.ndarray:
    """Per pixel, RGB distance to the background: the segment from the world colour to its pattern
    colour (antialiased stripes and dots are blends of the two), or the world colour alone."""
    bg = np.array(WORLDS[world][0], dtype=np.float32)
    if pattern == "none":
        return np.linalg.norm(img - bg, axis=-1)
    seg = np.array(WORLDS[world][1], dtype=np.float32) - bg
    t = np.clip(((img - bg) @ seg) / float(seg @ seg), 0.0, 1.0)
    return np.linalg.norm(img - (bg + t[..., None] * seg), axis=-1)


def _iou(mask: np.ndarray, x0: int, y0: int, shape: str, cx: float, cy: float, r: float) -> float:
    """IoU of a component mask (its box at x0, y0 in the frame, already padded to hold the
    template) with the template; pixels outside the frame do not exist for either."""
    h, w = mask.shape
    xs = np.arange(x0, x0 + w, dtype=np.float32) + 0.5 - cx
    ys = np.arange(y0, y0 + h, dtype=np.float32) + 0.5 - cy
    inside = _shape_distance(shape, xs[None, :], ys[:, None], r) < 0
    union = np.count_nonzero(inside | mask)
    return np.count_nonzero(inside & mask) / union if union else 0.0


def _refine(component: np.ndarray, x0: int, y0: int, shape: str, params: list[float],
            score: float) -> tuple[list[float], float]:
    """Coordinate search on (cx, cy, r) for a higher IoU, steps from r/4 down to r/20."""
    step = 0.25 * params[2]
    while step > 0.05 * params[2]:
        improved = False
        for i in range(3):
            for sign in (-1.0, 1.0):
                trial = list(params)
                trial[i] += sign * step
                if trial[2] <= 0:
                    continue
                s = _iou(component, x0, y0, shape, *trial)
                if s > score:
                    params, score, improved = trial, s, True
        if not improved:
            step /= 2
    return params, score


def _clipped_start(component: np.ndarray, x0: int, y0: int, shape: str, box: tuple[int, int, int, int],
                   frame_size: tuple[int, int], r_area: float) -> tuple[list[float], float]:
    """Best start for a shape cut by the frame edge. The sides of the visible box that do not touch
    the edge are the shape's true extent there; for each radius on a grid (at least the radius the
    visible area implies) they place the centre, and the best IoU wins."""
    x, y, w, h = box
    H, W = frame_size
    left, up, right, down = _EXTENT[shape]
    best: tuple[list[float], float] = ([0.0, 0.0, r_area], -1.0)
    for r in r_area * np.linspace(1.0, 3.0, 17):
        xs = ([x + left * r] if x > 0 else []) + ([x + w - right * r] if x + w < W else [])
        ys = ([y + up * r] if y > 0 else []) + ([y + h - down * r] if y + h < H else [])
        params = [float(np.mean(xs)) if xs else x + w / 2, float(np.mean(ys)) if ys else y + h / 2, float(r)]
        score = _iou(component, x0, y0, shape, *params)
        if score > best[1]:
            best = (params, score)
    return best


def _fit_shape(component: np.ndarray, x0: int, y0: int, centroid: tuple[float, float], area: float,
               box: tuple[int, int, int, int], frame_size: tuple[int, int]) -> tuple[str, float]:
    """Best shape for a component and its IoU. Unclipped: each template at the centroid with the
    component's area. Cut by the frame edge: the visible part's centroid and area understate the
    shape, so the template starts from the uncut sides of the box and is refined by a search."""
    x, y, w, h = box
    clipped = x == 0 or y == 0 or x + w == frame_size[1] or y + h == frame_size[0]
    best = ("circle", -1.0)
    for shape in SHAPES:
        r = math.sqrt(area / _AREA_PER_R2[shape])
        if clipped:
            params, score = _clipped_start(component, x0, y0, shape, box, frame_size, r)
            params, score = _refine(component, x0, y0, shape, params, score)
        else:
            score = _iou(component, x0, y0, shape, *centroid, r)
        if score > best[1]:
            best = (shape, score)
    return best


def _label_colours(frame: np.ndarray, world: str, pattern: str) -> np.ndarray:
    """(H, W) int: palette index per pixel, -1 where the pixel is background or no palette colour."""
    img = frame.astype(np.float32)
    # squared distances as |x|^2 - 2 x.p + |p|^2: one (H, W, 3) @ (3, 8) product
    d2_palette = (img * img).sum(-1, keepdims=True) - 2 * img @ _PALETTE.T + (_PALETTE ** 2).sum(-1)  # (H, W, 8)
    nearest = d2_palette.argmin(-1)
    d_nearest = np.sqrt(np.maximum(np.take_along_axis(d2_palette, nearest[..., None], -1)[..., 0], 0))
    ok = (d_nearest < PALETTE_TOLERANCE) & (d_nearest < _background_distance(img, world, pattern))
    return np.where(ok, nearest, -1)


def _min_area(height: int) -> float:
    """Noise floor: a share of the smallest character there can be (a small triangle at the end of
    'shrinks', wide framing) at this frame height."""
    r = SIZES["small"] * SHRINK * height / 128.0
    return MIN_AREA_FRACTION * _AREA_PER_R2["triangle"] * r * r


def _detect_with_masks(frame: np.ndarray, world: str, pattern: str) -> tuple[list[Detection], np.ndarray]:
    """Detections and the union of their pixels (for the background and flicker checks)."""
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"frame must be (H, W, 3) uint8 RGB, got {frame.shape} {frame.dtype}")
    if world not in WORLDS or pattern not in PATTERNS:
        raise ValueError(f"unknown world/pattern {world!r}/{pattern!r}; worlds: {list(WORLDS)}, patterns: {PATTERNS}")
    H, W = frame.shape[:2]
    labels = _label_colours(frame, world, pattern)
    kernel = np.ones((3, 3), np.uint8)
    min_area = _min_area(H)
    detections, covered = [], np.zeros((H, W), bool)
    for k in np.unique(labels):
        if k < 0:
            continue
        mask = (labels == k).astype(np.uint8)
        core = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
        n, comp, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
        core_count = np.bincount(comp[core > 0], minlength=n)
        for i in range(1, n):
            x, y, w, h, area = (int(v) for v in stats[i])
            if area < min_area or core_count[i] < MIN_CORE_FRACTION * area:
                continue
            pad = max(2, max(w, h))  # room for a template larger than the visible part
            x0, y0 = max(0, x - pad), max(0, y - pad)
            x1, y1 = min(W, x + w + pad), min(H, y + h + pad)
            component = comp[y0:y1, x0:x1] == i
            cx, cy = float(centroids[i][0]) + 0.5, float(centroids[i][1]) + 0.5
            shape, iou = _fit_shape(component, x0, y0, (cx, cy), float(area), (x, y, w, h), (H, W))
            if iou < MIN_SHAPE_IOU:
                continue
            detections.append(Detection(_PALETTE_NAMES[k], shape, cx, cy, float(area), math.sqrt(area / math.pi)))
            covered |= comp == i
    return detections, covered


def detect(frame: np.ndarray, world: str, pattern: str) -> list[Detection]:
    """The characters in one frame ((H, W, 3) uint8 RGB), any order. Sizes scale with the frame
    height (the world is drawn at 128 px height and scales with it)."""
    return _detect_with_masks(frame, world, pattern)[0]


# ---- scores ------------------------------------------------------------------------------------

@dataclass
class AppearanceScore:
    shot: int
    character: int  # index into StorySpec.characters
    described: bool  # the shot's caption states the look
    action: str
    present: float  # fraction of frames with a detection of the true colour and shape
    look_ok: bool  # present >= 0.5
    motion_ok: bool  # the stated action happens, judged on the true-look track
    wrong_look: bool  # the true colour mostly comes with a wrong shape, or the colour is mostly absent
    # the look ladder (where a look fails): fractions of frames with a part of the true colour, and
    # of the true colour at the look's size (any shape); present adds the shape
    colour_present: float = 0.0
    sized_present: float = 0.0


@dataclass
class ShotScore:
    shot: int
    appearances: list[AppearanceScore]
    background_ok: float  # fraction of frames whose background is the story's world
    smooth_ok: float  # fraction of consecutive frame pairs without flicker or jumps
    extra: int  # most distinct colours of no story character seen in one frame


@dataclass
class StoryScore:
    shots: list[ShotScore]
    adherence: float  # described appearances with look_ok and motion_ok (fraction)
    identity: float | None  # undescribed appearances with look_ok (fraction); None if none
    identity_no_global: float | None  # same, only characters the global caption does not name
    background: float  # mean background_ok times the share of shots agreeing with the story's background
    smoothness: float  # mean smooth_ok


def _background_colour(frame: np.ndarray, covered: np.ndarray) -> np.ndarray:
    """(3,) background estimate: per channel the interquartile mean of pixels away from detections.
    Not the median: with stripes the background is half world, half pattern colour, and a median
    would flip between the two from shot to shot; the interquartile mean sits between them stably
    and still ignores up to a quarter of outliers (undetected characters)."""
    away = ~cv2.dilate(covered.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    pixels = frame[away].astype(np.float32) if away.any() else frame.reshape(-1, 3).astype(np.float32)
    lo, hi = np.percentile(pixels, [25, 75], axis=0)
    keep = (pixels >= lo) & (pixels <= hi)  # (N, 3)
    return (pixels * keep).sum(0) / np.maximum(keep.sum(0), 1)


def _world_distance(colour: np.ndarray, world: str, pattern: str) -> float:
    return float(_background_distance(colour[None].astype(np.float32), world, pattern)[0])


def _background_ok(colour: np.ndarray, world: str, pattern: str) -> bool:
    """Near the story's world and nearer to it than to any other world (sky and snow are only
    ~53 apart, so a fixed tolerance alone would accept one for the other)."""
    d = {w: _world_distance(colour, w, pattern) for w in WORLDS}
    return d[world] <= WORLD_TOLERANCE and min(d, key=d.get) == world


def _thirds(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the first and of the last third (at least one entry each) of a sequence."""
    k = max(1, len(values) // 3)
    return values[:k].mean(0), values[-k:].mean(0)


def _motion_ok(action: str, centres: np.ndarray, radii: np.ndarray, travel_x: float, height: int) -> bool:
    """Does a track (centres (n, 2), radii (n,) over the detected frames in order) do `action`?
    travel_x: the ground-truth horizontal travel of a move in this shot, pixels."""
    if len(centres) < 3:
        return False
    first, last = _thirds(centres)
    dx, dy = last - first
    r_first, r_last = _thirds(radii)
    ratio = r_last / max(r_first, 1e-6)
    if action in ("left", "right"):
        along = dx if action == "right" else -dx
        return along > MOVE_FRACTION * travel_x and along > abs(dy)
    if action in ("up", "down"):
        along = dy if action == "down" else -dy
        return along > MOVE_FRACTION * MOVE_Y * height and along > abs(dx)
    if action == "grows":
        return ratio > GROW_RATIO
    if action == "shrinks":
        return ratio < SHRINK_RATIO
    y = centres[:, 1]
    if action == "bounces":  # rises (y falls) and comes back down: the top is not at either end
        top = int(y.argmin())
        rise = y.max() - y.min()
        return rise > BOUNCE_FRACTION * BOUNCE_Y * height and 0 < top < len(y) - 1 \
            and y[-1] - y[top] > 0.5 * rise and y[0] - y[top] > 0.5 * rise
    if action == "still":
        spread = np.linalg.norm(centres - np.median(centres, axis=0), axis=1).max()
        return spread < STILL_FRACTION * BOUNCE_Y * height and STILL_RATIO[0] <= ratio <= STILL_RATIO[1]
    raise ValueError(f"unknown action {action!r}; actions: {ACTIONS}")


def _largest(detections: list[Detection]) -> Detection | None:
    return max(detections, key=lambda d: d.area) if detections else None


def score_shot(spec: StorySpec, shot: int, frames: np.ndarray) -> ShotScore:
    """Score one shot's frames ((F, H, W, 3) uint8 RGB, any F and frame size) against the spec."""
    return _score_shot(spec, shot, frames)[0]


def _score_shot(spec: StorySpec, shot: int, frames: np.ndarray) -> tuple[ShotScore, np.ndarray]:
    """score_shot, plus the shot's background colour (median over frames) for the story's
    cross-shot consistency check."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"frames must be (F, H, W, 3) uint8 with F >= 1, got {frames.shape}")
    F, H, W = frames.shape[:3]
    sh = spec.shots[shot]
    per_frame = [_detect_with_masks(f, spec.world, spec.pattern) for f in frames]
    story_colours = {c.colour for c in spec.characters}

    # expected per-frame centroid step of every character, from the ground truth at this size
    truth = track(spec, shot, H, W) if F == spec.frames else None
    n_in_shot = len(sh.appearances)
    travel_x = MOVE_X / n_in_shot * W

    appearances, colour_tracks = [], []
    scale = (CLOSE_UP_SCALE if sh.framing == "close" else 1.0) * H / 128.0
    for j, a in enumerate(sh.appearances):
        c = spec.characters[a.character]
        equivalent = math.sqrt(_AREA_PER_R2[c.shape] / math.pi)  # template radius -> radius of equal area
        if truth is not None:
            sizes = [(p.radius * equivalent,) * 2 for p in (frame[j] for frame in truth)]
        else:  # another frame count: anywhere in what the action spans
            base = SIZES[c.size] * scale * equivalent
            lo, hi = base * min(1.0, SHRINK if a.action == "shrinks" else 1.0), base * (GROW if a.action == "grows" else 1.0)
            sizes = [(lo, hi)] * F
        right = [_largest([d for d in dets if d.colour == c.colour and d.shape == c.shape
                           and lo / SIZE_RATIO <= d.radius <= hi * SIZE_RATIO])
                 for (dets, _), (lo, hi) in zip(per_frame, sizes)]
        same_colour = [_largest([d for d in dets if d.colour == c.colour]) for dets, _ in per_frame]
        sized = sum(any(d.colour == c.colour and lo / SIZE_RATIO <= d.radius <= hi * SIZE_RATIO for d in dets)
                    for (dets, _), (lo, hi) in zip(per_frame, sizes))
        n_right = sum(d is not None for d in right)
        n_colour = sum(d is not None for d in same_colour)
        present = n_right / F
        seen = [d for d in right if d is not None]
        centres = np.array([(d.cx, d.cy) for d in seen], dtype=np.float64).reshape(-1, 2)
        radii = np.array([d.radius for d in seen], dtype=np.float64)
        appearances.append(AppearanceScore(
            shot=shot, character=a.character, described=a.described, action=a.action, present=present,
            look_ok=present >= 0.5, motion_ok=_motion_ok(a.action, centres, radii, travel_x, H),
            wrong_look=(n_colour - n_right) > n_right or n_colour < 0.5 * F,
            colour_present=n_colour / F, sized_present=sized / F))
        colour_tracks.append(same_colour)

    # background
    backgrounds = [_background_colour(f, covered) for f, (_, covered) in zip(frames, per_frame)]
    background_ok = float(np.mean([_background_ok(b, spec.world, spec.pattern) for b in backgrounds]))

    # smoothness: per pair, the background may not change, no character may (dis)appear or jump
    smooth = []
    # 5x5 box-filtered frames: pixel noise (independent per frame) averages out, a flash does not
    smoothed = [cv2.blur(f.astype(np.float32), (5, 5)) for f in frames]
    for t in range(F - 1):
        covered = (per_frame[t][1] | per_frame[t + 1][1]).astype(np.uint8)
        away = ~cv2.dilate(covered, np.ones((5, 5), np.uint8)).astype(bool)  # not near a character in either frame
        diff = np.abs(smoothed[t] - smoothed[t + 1])[away].mean() if away.any() else 0.0
        ok = diff < BACKGROUND_DIFF
        for j, track_j in enumerate(colour_tracks):
            d0, d1 = track_j[t], track_j[t + 1]
            if (d0 is None) != (d1 is None):
                ok = False
            elif d0 is not None:
                if truth is not None:
                    p0, p1 = truth[t][j], truth[t + 1][j]
                    expected = math.hypot(p1.cx - p0.cx, p1.cy - p0.cy)
                else:  # another frame count than the spec's: the largest step any action can take
                    expected = max(MOVE_X * W, MOVE_Y * H, 2 * BOUNCE_Y * H) / max(F - 1, 1)
                limit = 1.5 * expected + JUMP_MARGIN * H
                ok = ok and math.hypot(d1.cx - d0.cx, d1.cy - d0.cy) <= limit
        smooth.append(ok)
    smooth_ok = float(np.mean(smooth)) if smooth else 1.0

    extra = max(len({d.colour for d in dets} - story_colours) for dets, _ in per_frame)
    return ShotScore(shot, appearances, background_ok, smooth_ok, extra), np.median(backgrounds, axis=0)


def _fraction(flags: list[bool]) -> float | None:
    return float(np.mean(flags)) if flags else None


def score_story(spec: StorySpec, frames: list[np.ndarray]) -> StoryScore:
    """Score every shot (frames[s]: (F, H, W, 3) uint8) and sum up the story."""
    if len(frames) != len(spec.shots):
        raise ValueError(f"need one frame array per shot: the story has {len(spec.shots)} shots, got {len(frames)}")
    scored = [_score_shot(spec, s, np.asarray(f)) for s, f in enumerate(frames)]
    shots = [s for s, _ in scored]
    apps = [a for s in shots for a in s.appearances]
    # the global caption states the looks exactly when it names the characters (world.sample_story)
    named = {i for i, c in enumerate(spec.characters) if re.search(rf"\b{re.escape(c.name)}\b", spec.global_caption)}
    undescribed = [a for a in apps if not a.described]
    adherence = _fraction([a.look_ok and a.motion_ok for a in apps if a.described])

    # cross-shot consistency: every shot's background near the median of all shots' backgrounds
    colours = np.array([b for _, b in scored])  # (S, 3)
    centre = np.median(colours, axis=0)
    consistent = float(np.mean(np.linalg.norm(colours - centre, axis=1) <= CONSISTENCY_TOLERANCE))
    return StoryScore(
        shots=shots,
        adherence=0.0 if adherence is None else adherence,  # None only for hand-made specs without a described look
        identity=_fraction([a.look_ok for a in undescribed]),
        identity_no_global=_fraction([a.look_ok for a in undescribed if a.character not in named]),
        background=float(np.mean([s.background_ok for s in shots])) * consistent,
        smoothness=float(np.mean([s.smooth_ok for s in shots])),
    )


__all__ = ["Detection", "detect", "AppearanceScore", "ShotScore", "StoryScore", "score_shot", "score_story"]
