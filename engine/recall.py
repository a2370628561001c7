"""What a shot remembered: the frames of other shots its queries recalled most, ranked, as data.

For: `recall(report, shot, layer=None, frame=None)`, a pure function over the routing report's
`frame_routed` (engine/routing_report.py: routed top-k picks per layer x query frame x key frame)
that ranks the key frames of *other* shots by recall share, and `with_thumbnails(...)`, the small
pictures of the recalled latent frames (each the middle video frame it decodes to, read from its
take by StoryEngine.take_pictures). The app's recall view
and the /recall endpoint both read this.
Not for: routing (engine/moc), recording (routing_report.py) or drawing (app/recall.py).

Recall share of key frame j for the chosen queries (shot s; one layer or all; one query frame of s
or all of them):
    share[j] = picks[j] / sum of picks[j'] over frames j' of other shots
where picks[j] sums `frame_routed[layer, i, j]` over the chosen layers and query frames i. Only
routed picks count: forced links (the own-shot anchor, memory pins, the captions) are never ranked;
pins are listed apart. With causal routing every recalled frame lies in an earlier shot; a shot
regenerated with both sides as context may also recall later ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

THUMBNAIL_WIDTH = 96  # pixels; the gallery's small pictures


@dataclass(frozen=True)
class RecalledFrame:
    shot: int  # the key frame's shot (0-based)
    frame: int  # its latent frame within that shot (0-based)
    share: float  # of the chosen queries' routed picks into other shots, in (0, 1]
    picks: float  # routed picks on this frame per (query token, head), mean over the chosen layers
    thumbnail: np.ndarray | None = None  # (h, w, 3) uint8, see `with_thumbnails`


@dataclass(frozen=True)
class Recall:
    shot: int  # the query shot
    layer: int | None  # None: all layers (picks summed over layers, then normalised)
    frame: int | None  # the query frame within the shot; None: all of its frames
    frames: list[RecalledFrame]  # every frame of another shot with a routed pick, highest share first
    routed_picks: float  # routed picks into other shots per (query token, head), mean over chosen layers
    own_shot_picks: float  # routed picks inside the own shot (anchor "chunk"/"window" only; else 0)
    pinned: list[int] = field(default_factory=list)  # shots this shot always sees (forced, not ranked)
    blocked: list[int] = field(default_factory=list)  # shots it never recalls
    recorded: bool = True  # False: the take predates per-frame recall statistics (regenerate it)

    def to_dict(self, encode=None) -> dict:
        """JSON-ready; `encode(thumbnail) -> str` adds each thumbnail (e.g. a PNG data URL)."""
        frames = []
        for f in self.frames:
            item = {"shot": f.shot, "frame": f.frame, "share": round(f.share, 4), "picks": round(f.picks, 4)}
            if encode is not None and f.thumbnail is not None:
                item["thumbnail"] = encode(f.thumbnail)
            frames.append(item)
        return {"shot": self.shot, "layer": self.layer, "frame": self.frame, "recalled": frames,
                "routed_picks": round(self.routed_picks, 4), "own_shot_picks": round(self.own_shot_picks, 4),
                "pinned": list(self.pinned), "blocked": list(self.blocked), "recorded": self.recorded}


def _check(name: str, value, size: int, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < size:
        raise ValueError(f"{name} must be an integer in [0, {size - 1}] ({what}) or None, got {value!r}")
    return int(value)


def recall(report: dict, shot: int, layer: int | None = None, frame: int | None = None) -> Recall:
    """Rank the frames of other shots by how much of shot `shot`'s routing they drew (see module doc)."""
    shot_frames = [int(n) for n in report["shot_frames"]]
    S, L = len(shot_frames), int(report["num_layers"])
    shot = _check("shot", shot, S, f"the story has {S} shots")
    if shot is None:
        raise ValueError("shot must be a shot index, got None")
    layer = _check("layer", layer, L, f"the model has {L} layers; None for all")
    frame = _check("frame", frame, shot_frames[shot], f"shot {shot} has {shot_frames[shot]} latent frames; "
                                                      "None for all")
    starts = np.concatenate([[0], np.cumsum(shot_frames)]).astype(int)
    owner = np.repeat(np.arange(S), shot_frames)  # (F,) shot of every story frame
    pinned = sorted(b for a, b in report.get("pins") or [] if a == shot)
    blocked = sorted(b for a, b in report.get("blocks") or [] if a == shot)
    recorded = bool((report.get("routed_shots") or [False] * S)[shot])
    routed = np.asarray(report.get("frame_routed") or np.zeros((L, starts[-1], starts[-1])), dtype=np.float64)
    if not recorded or routed.shape != (L, starts[-1], starts[-1]):
        return Recall(shot, layer, frame, [], 0.0, 0.0, pinned, blocked, recorded=False)
    # 1. the chosen queries' rows: shot `shot`'s frames (or one of them), one layer (or all)
    rows = routed[:, starts[shot]:starts[shot + 1]]  # (L, f, F)
    if layer is not None:
        rows = rows[layer:layer + 1]
    if frame is not None:
        rows = rows[:, frame:frame + 1]
    picks = rows.mean(axis=1).mean(axis=0)  # (F,) per (query token, head), mean over the chosen layers
    # 2. split into other shots (ranked) and the own shot (reported apart)
    other = owner != shot
    total = float(picks[other].sum())
    ranked = sorted((int(j) for j in np.flatnonzero(other & (picks > 0))), key=lambda j: (-picks[j], j))
    frames = [RecalledFrame(int(owner[j]), int(j - starts[owner[j]]), float(picks[j] / total), float(picks[j]))
              for j in ranked]
    return Recall(shot, layer, frame, frames, total, float(picks[~other].sum()), pinned, blocked)


def thumbnail(image: torch.Tensor, width: int = THUMBNAIL_WIDTH) -> np.ndarray:
    """(h, w, 3) uint8: one decoded frame (H, W, 3) scaled to `width` pixels, the aspect kept
    (area-averaged down, nearest up)."""
    image = image.permute(2, 0, 1)[None].float()  # (1, 3, H, W)
    H, W = image.shape[-2:]
    height = max(1, round(H * width / W))
    mode = "area" if width < W else "nearest"
    small = F.interpolate(image, size=(height, width), mode=mode)
    return small[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def with_thumbnails(result: Recall, pictures, width: int = THUMBNAIL_WIDTH) -> Recall:
    """The same recall with each frame's thumbnail. `pictures(shot, latent_frames)` gives, for
    those latent frames of the shot's take, one decoded frame each (n, H, W, 3), or None (no
    take: those frames keep no thumbnail); StoryEngine.take_pictures does, given the take's key."""
    wanted: dict[int, list[int]] = {}
    for f in result.frames:
        wanted.setdefault(f.shot, []).append(f.frame)
    images = {}
    for shot, latent_frames in wanted.items():
        got = pictures(shot, latent_frames)
        if got is not None:
            images.update({(shot, k): image for k, image in zip(latent_frames, got)})
    frames = [replace(f, thumbnail=thumbnail(images[f.shot, f.frame], width)) if (f.shot, f.frame) in images else f
              for f in result.frames]
    return replace(result, frames=frames)


__all__ = ["Recall", "RecalledFrame", "THUMBNAIL_WIDTH", "recall", "thumbnail", "with_thumbnails"]
