"""Token layout of one story sequence: which tokens form which chunk, frame and shot.

For: describing a multi-shot token stream (optional text segments first, then video frames in
frame-major order) and cutting it into content-aligned chunks. Every routing rule in
`routing.py` is phrased in terms of these chunks.
Not for: routing itself, or anything that touches q/k/v tensors.

Sequence order: [text segments ...][shot 0 frames][shot 1 frames]...; a frame is `frame_tokens`
consecutive tokens. Text segments (for backbones that put text into self-attention) carry the
shot they caption, or -1 for the global caption.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

CHUNKINGS = ("frame", "subframe", "fixed")


@dataclass(frozen=True)
class TokenLayout:
    frame_tokens: int  # tokens per latent frame (latent height × width after patchify)
    shot_frames: tuple[int, ...]  # latent frames per shot, in story order
    text_tokens: tuple[int, ...] = ()  # tokens per text segment placed before the video
    text_shots: tuple[int, ...] = ()  # shot each text segment captions (-1 = global caption)
    chunking: str = "frame"  # "frame" | "subframe" (frames cut to <= chunk_size) | "fixed"
    chunk_size: int = 0  # max tokens per chunk for "subframe" and "fixed" (ignored for "frame")

    def __post_init__(self):
        if int(self.frame_tokens) <= 0:
            raise ValueError(f"frame_tokens must be >= 1 (tokens per latent frame), got {self.frame_tokens}")
        if len(self.shot_frames) == 0:
            raise ValueError("shot_frames must list at least one shot, got an empty tuple")
        for i, f in enumerate(self.shot_frames):
            if int(f) <= 0:
                raise ValueError(f"shot_frames[{i}] must be >= 1 frame (empty shots are not allowed), got {f}")
        if len(self.text_shots) != len(self.text_tokens):
            raise ValueError(
                f"text_shots must give one shot per text segment: {len(self.text_tokens)} segments, "
                f"{len(self.text_shots)} shots")
        for i, (t, s) in enumerate(zip(self.text_tokens, self.text_shots)):
            if int(t) <= 0:
                raise ValueError(f"text_tokens[{i}] must be >= 1, got {t}")
            if not -1 <= int(s) < len(self.shot_frames):
                raise ValueError(f"text_shots[{i}] must be -1 (global) or in [0, {len(self.shot_frames) - 1}], got {s}")
        if self.chunking not in CHUNKINGS:
            raise ValueError(f"chunking must be one of {CHUNKINGS}, got {self.chunking!r}")
        if self.chunking != "frame" and int(self.chunk_size) <= 0:
            raise ValueError(f"chunk_size must be >= 1 for chunking={self.chunking!r}, got {self.chunk_size}")

    # ---- sizes -------------------------------------------------------------------------------

    @property
    def num_shots(self) -> int:
        return len(self.shot_frames)

    @property
    def num_frames(self) -> int:
        return sum(self.shot_frames)

    @property
    def text_len(self) -> int:
        return sum(self.text_tokens)

    @property
    def num_tokens(self) -> int:
        return self.text_len + self.num_frames * self.frame_tokens

    @property
    def num_chunks(self) -> int:
        return len(self.chunks)

    def shot_range(self, shot: int) -> tuple[int, int]:
        """Token range [start, end) of a shot's video tokens."""
        start = self.text_len + sum(self.shot_frames[:shot]) * self.frame_tokens
        return start, start + self.shot_frames[shot] * self.frame_tokens

    def shot_frame_range(self, shot: int) -> tuple[int, int]:
        """Global frame index range [start, end) of a shot."""
        start = sum(self.shot_frames[:shot])
        return start, start + self.shot_frames[shot]

    # ---- chunks ------------------------------------------------------------------------------

    @cached_property
    def chunks(self) -> tuple[tuple[int, int, int, int, bool], ...]:
        """Every chunk as (start, end, shot, frame, is_text); frame is -1 for text chunks."""
        out = []
        pos = 0
        for n, shot in zip(self.text_tokens, self.text_shots):
            out.append((pos, pos + n, int(shot), -1, True))
            pos += n
        frame = 0
        for shot, nf in enumerate(self.shot_frames):
            if self.chunking == "fixed":
                # fixed-size chunks restart at every shot so that no chunk straddles a cut
                shot_start, shot_end = pos, pos + nf * self.frame_tokens
                for a in range(shot_start, shot_end, self.chunk_size):
                    b = min(a + self.chunk_size, shot_end)
                    out.append((a, b, shot, frame + (a - shot_start) // self.frame_tokens, False))
                pos, frame = shot_end, frame + nf
                continue
            for _ in range(nf):
                for a, b in self._frame_pieces():
                    out.append((pos + a, pos + b, shot, frame, False))
                pos += self.frame_tokens
                frame += 1
        return tuple(out)

    def _frame_pieces(self) -> list[tuple[int, int]]:
        """Offsets of the chunks inside one frame: whole frame, or near-equal pieces <= chunk_size."""
        n = self.frame_tokens
        if self.chunking == "frame" or self.chunk_size >= n:
            return [(0, n)]
        pieces = -(-n // self.chunk_size)  # ceil: fewest pieces that respect the cap
        bounds = [round(i * n / pieces) for i in range(pieces + 1)]
        return list(zip(bounds[:-1], bounds[1:]))

    @cached_property
    def tensors(self) -> "LayoutTensors":
        return LayoutTensors.from_layout(self)

    def memo(self, key, make):
        """make(), computed once per layout and key. For layout-derived tensors on a GPU: a copy
        from the host waits for the GPU's queue to drain, and routing and the kernels need them in
        every layer, forward and backward (one copy per layer was most of a training step's host
        synchronisations)."""
        memo = self.__dict__.setdefault("_memo", {})  # a frozen dataclass: its __dict__ holds the cache
        if key not in memo:
            memo[key] = make()
        return memo[key]

    def tensors_on(self, device) -> "LayoutTensors":
        """`tensors` on `device`, copied there once per layout."""
        device = torch.device(device)
        if device.type == "cpu":
            return self.tensors
        return self.memo(("tensors", str(device)), lambda: self.tensors.to(device))


@dataclass(frozen=True)
class LayoutTensors:
    """The layout as int tensors (CPU); `to(device)` for kernels."""

    chunk_start: torch.Tensor  # (C,) int64 first token of each chunk
    chunk_end: torch.Tensor  # (C,) int64 one past the last token
    chunk_shot: torch.Tensor  # (C,) int64 shot id, -1 for the global caption
    chunk_frame: torch.Tensor  # (C,) int64 global frame index, -1 for text
    chunk_is_text: torch.Tensor  # (C,) bool
    token_chunk: torch.Tensor  # (N,) int64 chunk of every token

    @staticmethod
    def from_layout(layout: TokenLayout) -> "LayoutTensors":
        start, end, shot, frame, is_text = zip(*layout.chunks)
        start = torch.tensor(start, dtype=torch.int64)
        end = torch.tensor(end, dtype=torch.int64)
        # bucketize every token position into its chunk (chunks tile [0, N) in order)
        token_chunk = torch.bucketize(torch.arange(layout.num_tokens), end, right=True)
        return LayoutTensors(start, end, torch.tensor(shot), torch.tensor(frame),
                             torch.tensor(is_text), token_chunk)

    def to(self, device) -> "LayoutTensors":
        return LayoutTensors(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    @property
    def chunk_len(self) -> torch.Tensor:
        return self.chunk_end - self.chunk_start
