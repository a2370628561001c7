"""MP4 writing: H.264, yuv420p, via PyAV, so the files play in Chromium and Firefox.

For: `write_mp4(path, frames, fps)`; `concat_mp4(paths, path)`: MP4s that write_mp4 made, joined
by copying their packets (no re-encoding; ValueError where their streams differ); `copy_mp4`.
Every write is atomic: to a temp name in the same folder, then renamed.
Not for: decoding latents (codec.py). opencv-python from PyPI cannot encode H.264, hence PyAV.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import NamedTuple

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


def concat_mp4(paths, path: str | Path) -> Path:
    """One MP4 of the parts one after another, their H.264 packets copied as they are: each part's
    timestamps are shifted to start where the one before it ends. One track has one avcC, so the
    parts must agree on codec, size, pixel format, frame rate, time base and SPS/PPS (extradata);
    where they do not, a ValueError names the first difference (encode from frames instead)."""
    import av
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("concat_mp4 needs at least one part")
    formats, timings = [], []
    for p in paths:  # 1. each part's stream format and timing
        with av.open(str(p)) as part:
            stream = part.streams.video[0]
            formats.append(_stream_format(stream))
            timings.append(_timing(part.demux(stream), p.name))
    for p, other in zip(paths[1:], formats[1:]):
        if other != formats[0]:
            name = next(k for k in other if other[k] != formats[0][k])
            raise ValueError(f"{p.name} differs from {paths[0].name} in {name}: "
                             f"{other[name]!r} != {formats[0][name]!r}")
    # x264 decodes ahead of display (dts < pts) only in a part long enough for B-frames (a 2-frame
    # shot has none): every part's dts are lowered to the largest lead, so decode times run on
    # across the joins. pts, the packets and their order, hence the decoded frames, are unchanged.
    lead = max(t.lead for t in timings)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.mp4")
    try:
        with av.open(str(tmp), mode="w", format="mp4", options={"movflags": "+faststart"}) as out:
            stream, offset, last_dts = None, 0, None  # offset, dts: in the parts' (shared) time base
            for p, t in zip(paths, timings):  # 2. the packets, shifted
                with av.open(str(p)) as part:
                    src = part.streams.video[0]
                    if stream is None:  # the first part's codec parameters (its avcC) serve all
                        stream = out.add_stream_from_template(src)
                    for pk in part.demux(src):
                        if not pk.size:  # the demuxer ends with an empty packet
                            continue
                        pk.pts += offset - t.start
                        pk.dts += offset - t.start - (lead - t.lead)
                        if last_dts is not None and pk.dts <= last_dts:
                            raise ValueError(f"{p.name}: decode times would run backwards at the join")
                        last_dts, pk.stream = pk.dts, stream
                        out.mux(pk)
                offset += t.end - t.start
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class _Timing(NamedTuple):
    start: int  # first pts
    end: int  # last pts + its duration
    lead: int  # start - first dts: how far decoding runs ahead of display (B-frames)


def _timing(packets, name: str) -> _Timing:
    start = end = first_dts = None
    for pk in packets:
        if not pk.size:
            continue
        if pk.pts is None or pk.dts is None:
            raise ValueError(f"{name}: a packet without timestamps")
        start = pk.pts if start is None else min(start, pk.pts)
        end = pk.pts + pk.duration if end is None else max(end, pk.pts + pk.duration)
        first_dts = pk.dts if first_dts is None else min(first_dts, pk.dts)
    if start is None:
        raise ValueError(f"{name}: no video packets")
    return _Timing(start, end, start - first_dts)


def _stream_format(stream) -> dict:
    """What must match for two H.264 streams to share one track."""
    cc = stream.codec_context
    return {"codec": cc.name, "width": cc.width, "height": cc.height, "pix_fmt": cc.pix_fmt,
            "frame rate": stream.average_rate, "time base": stream.time_base,
            "extradata (SPS/PPS)": bytes(cc.extradata or b"")}


def copy_mp4(src: str | Path, path: str | Path) -> Path:
    """A copy of `src` at `path` (a copy, not a link: the source may be a shot cache's own file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.mp4")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_mp4(path: str | Path) -> np.ndarray:
    """(T, H, W, 3) uint8 frames of a video (tests and tools)."""
    import av
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


__all__ = ["write_mp4", "concat_mp4", "copy_mp4", "read_mp4"]
