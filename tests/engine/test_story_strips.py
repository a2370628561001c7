"""scripts/story_strips.py: the README's story pictures put each shot's frames in its row."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from story_strips import GAP, LABEL_WIDTH, strip_image  # noqa: E402


def test_each_shot_row_holds_its_own_evenly_spaced_frames():
    rng = np.random.default_rng(0)
    shots = [rng.integers(0, 256, (7, 20, 30, 3), dtype=np.uint8) for _ in range(3)]  # 7 frames: uneven steps
    img = strip_image(shots, ["a", "b", "c"], "A story.", frames_shown=3)
    title = img.shape[0] - 3 * (20 + GAP)
    assert img.shape[1] == LABEL_WIDTH + 3 * (30 + GAP) and title > 0
    for i, frames in enumerate(shots):
        y = title + i * (20 + GAP)
        for j, t in enumerate((0, 3, 6)):  # first, middle, last
            x = LABEL_WIDTH + j * (30 + GAP)
            assert np.array_equal(img[y:y + 20, x:x + 30], frames[t])
    assert img[title:title + 20, :LABEL_WIDTH].min() < 100  # the caption is drawn
