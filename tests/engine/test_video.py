"""MP4 writing and joining: concat_mp4 copies the parts' packets (decoded frames equal the parts'
exactly), refuses parts whose streams differ, and the engine's story video falls back to encoding."""

import av
import numpy as np
import pytest
import torch

from engine.engine import StoryEngine
from engine.events import ShotResult
from engine.shot_cache import Take
from engine.video import concat_mp4, read_mp4, write_mp4


def smooth_clip(frames: int, height: int = 34, width: int = 50, seed: int = 0) -> np.ndarray:
    """(T, H, W, 3) uint8 moving colour waves: smooth enough for H.264 to keep, different per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    phase = rng.uniform(0, 6, 3)
    clip = [np.stack([127 + 120 * np.sin(x / 7 + y / 11 + phase[c] + 0.4 * t) for c in range(3)], -1)
            for t in range(frames)]
    return np.clip(np.stack(clip), 0, 255).astype(np.uint8)


def packets(path) -> list[bytes]:
    with av.open(str(path)) as container:
        return [bytes(p) for p in container.demux(video=0) if p.size]


@pytest.mark.parametrize("lengths", [(5, 7, 3), (2, 5, 1, 3, 2)], ids=["5-7-3", "with-parts-too-short-for-B-frames"])
def test_concat_of_odd_length_clips_copies_every_packet(tmp_path, lengths):
    parts = [write_mp4(tmp_path / f"part{i}.mp4", smooth_clip(n, seed=i), fps=8) for i, n in enumerate(lengths)]
    story = concat_mp4(parts, tmp_path / "story.mp4")
    frames = read_mp4(story)
    assert frames.shape == (sum(lengths), 34, 50, 3)
    assert np.array_equal(frames, np.concatenate([read_mp4(p) for p in parts]))  # remuxed, not re-encoded
    assert packets(story) == [pk for p in parts for pk in packets(p)]
    with av.open(str(story)) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == 8 and stream.frames == sum(lengths)
        assert float(stream.duration * stream.time_base) == pytest.approx(sum(lengths) / 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([p.name for p in parts] + ["story.mp4"])


def _ultrafast_mp4(path, frames: np.ndarray, fps: int):
    """Same size, fps and pixel format as write_mp4, other x264 settings: other SPS/PPS, no B-frames."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"preset": "ultrafast"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.mark.parametrize("second, differs", [
    (lambda p: write_mp4(p, smooth_clip(7, height=36), fps=8), "height"),
    (lambda p: write_mp4(p, smooth_clip(7), fps=12), "frame rate"),
    (lambda p: _ultrafast_mp4(p, smooth_clip(7), fps=8), "extradata"),
], ids=["size", "fps", "x264-settings"])
def test_concat_refuses_parts_whose_streams_differ(tmp_path, second, differs):
    first = write_mp4(tmp_path / "a.mp4", smooth_clip(5), fps=8)
    other = second(tmp_path / "b.mp4")
    with pytest.raises(ValueError, match=differs):
        concat_mp4([first, other], tmp_path / "story.mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "b.mp4"]  # no story, no temp file


def test_story_video_falls_back_to_encoding_the_frames(tmp_path):
    """Shot files of different sizes cannot share a track: story.mp4 is encoded from the takes'
    frames instead, and says so."""
    clips = [smooth_clip(5, seed=1), smooth_clip(7, seed=2)]
    paths = [write_mp4(tmp_path / "shot_00.mp4", clips[0], fps=8),
             write_mp4(tmp_path / "shot_01.mp4", np.pad(clips[1], ((0, 0), (0, 4), (0, 0), (0, 0))), fps=8)]
    shots = [ShotResult(index=i, status="cached", video_path=p, seconds=0.0, density=1.0, seed=0, key="ab")
             for i, p in enumerate(paths)]
    takes = {i: Take(key="ab", frames=torch.from_numpy(c), latents=torch.zeros(1), meta={})
             for i, c in enumerate(clips)}
    video, because = StoryEngine._story_video(tmp_path / "story.mp4", shots, takes, fps=8)
    assert "height" in because and "encoded from the frames" in because
    assert read_mp4(video).shape == (12, 34, 50, 3)
    joined, because = StoryEngine._story_video(tmp_path / "story.mp4", shots[:1], takes, fps=8)
    assert because == "" and np.array_equal(read_mp4(joined), read_mp4(paths[0]))
