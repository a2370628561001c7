"""benchmarks/overfit.py on a tiny random model: it fine-tunes, renders the way the app does and
reads the look ladder (the numbers themselves are GPU-model figures, never asserted)."""

import math

import pytest

from benchmarks.overfit import fixed_stories, overfit, render_and_score
from engine.default_model import write_default_model
from engine.model import StoryModel

TINY_TRANSFORMER = dict(num_attention_heads=2, attention_head_dim=12, num_layers=2, ffn_dim=32, freq_dim=32)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return write_default_model(tmp_path_factory.mktemp("tiny_model"), seed=1, transformer=TINY_TRANSFORMER)


def test_overfit_trains_and_scores_renders_like_the_app(tiny_model_dir):
    result = overfit(tiny_model_dir, stories=1, shots=2, frames=2, steps=3, every=3, lr=1e-2, log=lambda _: None)
    rows = result["rows"]
    assert [r["step"] for r in rows] == [0, 3]
    assert rows[0]["loss"] is None and math.isfinite(rows[1]["loss"]) and rows[1]["loss"] > 0
    assert result["weight_change"] > 0  # the steps moved the weights
    # step 0 is the loaded model untouched: the same render and score as a fresh load of the folder
    fresh, strips = render_and_score(StoryModel.load(tiny_model_dir, device="cpu"), fixed_stories(1, 2, 2), 128, 192)
    assert {k: rows[0][k] for k in fresh} == fresh
    for r in rows:  # the ladder's rungs only narrow
        lad = r["look_ladder"]
        assert 1 >= lad["colour"] >= lad["colour_size"] >= lad["colour_size_shape"] >= lad["look_and_motion"] >= 0
        assert r["appearances"] > 0
    assert len(result["strips"][3]) == 2 and strips[0].shape == result["strips"][0][0].shape  # one strip a shot
