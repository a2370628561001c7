"""MP4 writing: H.264, yuv420p, via PyAV, so the files play in Chromium and Firefox.

For: `write_mp4(path, frames, fps)` (atomic: written to a temp name, then renamed).
Not for: decoding latents (codec.py). opencv-python from PyPI cannot encode H.264, hence PyAV.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np


def write_mp4(path: str | Path, frames, fps: int) -> Path:
    """frames (T, H, W, 3) uint8 (numpy or torch); odd sizes are padded by one edge pixel
    (yuv420p needs even width and height)."""
    import av
    path = Path(path)
    frames = np.asarray(frames.numpy() if hasattr(frames, "numpy") else frames, dtype=np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"frames must be (T>0, H, W, 3) uint8, got {frames.shape}")
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.mp4")
    try:
        with av.open(str(tmp), mode="w") as container:
            stream = container.add_stream("libx264", rate=int(fps))
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": "18", "preset": "veryfast", "movflags": "+faststart"}
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_mp4(path: str | Path) -> np.ndarray:
    """(T, H, W, 3) uint8 frames of a video (tests and tools)."""
    import av
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


__all__ = ["write_mp4", "read_mp4"]
