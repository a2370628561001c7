"""benchmarks/caption_swap.py: the swap changes exactly the drawn look, the two-sided scoring
tells caption from drawing, and the probe runs end to end on a tiny random model (its numbers
are figures of a trained model, never asserted)."""

import dataclasses

import numpy as np
import pytest

from benchmarks.caption_swap import main, probe_stories, run, score_both, swapped
from benchmarks.quality import look_ladder
from engine.default_model import write_default_model
from engine.model import StoryModel
from engine.shapestory.render import story_frames

TINY_TRANSFORMER = dict(num_attention_heads=2, attention_head_dim=12, num_layers=2, ffn_dim=32, freq_dim=32)


@pytest.mark.parametrize("kind", ["shape", "colour"])
def test_swap_changes_only_that_part_of_every_look(kind):
    spec = probe_stories(1, shots=4)[0]
    for turn in (1, 2, 3):
        drawn = swapped(spec, kind, turn)
        assert drawn.shots == spec.shots and drawn.global_caption == spec.global_caption  # captions kept
        for a, b in zip(spec.characters, drawn.characters):
            assert getattr(a, kind) != getattr(b, kind)
            other = "colour" if kind == "shape" else "shape"
            assert (a.name, a.size, getattr(a, other)) == (b.name, b.size, getattr(b, other))
        assert len({c.colour for c in drawn.characters}) == len(drawn.characters)
    assert swapped(spec, "none") is spec
    with pytest.raises(ValueError, match="kind"):
        swapped(spec, "size")
    with pytest.raises(ValueError, match="turn"):
        swapped(spec, "shape", 4)


def test_scoring_both_sides_tells_the_caption_from_the_drawing():
    """Frames drawn with the swapped shapes score as the drawing, not as the caption; frames drawn
    as the caption says score the other way round."""
    spec = probe_stories(2, shots=3)[1]
    drawn = swapped(spec, "shape")
    frames = list(story_frames(drawn).numpy())
    got = score_both(spec, drawn, frames)
    cap, drw = look_ladder(got["caption"]), look_ladder(got["drawn"])
    assert drw["colour_size_shape"] > 0.8 and cap["colour_size_shape"] < 0.2
    assert cap["colour"] == drw["colour"]  # colours were not swapped
    total, ok = got["not_circle"]
    assert total == sum(sh.framing in ("wide", "close") for sh in spec.shots for a in sh.appearances
                        if spec.characters[a.character].shape != "circle") and ok <= total
    faithful = score_both(spec, drawn, list(story_frames(spec).numpy()))
    assert look_ladder(faithful["caption"])["colour_size_shape"] > 0.8
    assert look_ladder(faithful["drawn"])["colour_size_shape"] < 0.2


def test_probe_runs_end_to_end_on_a_tiny_model(tmp_path):
    folder = write_default_model(tmp_path / "tiny", seed=2, transformer=TINY_TRANSFORMER)
    model = StoryModel.load(folder, device="cpu")
    result = run(model, stories=1, start=0.86, log=lambda _: None)
    assert 0.8 < result["level"] < 0.9  # the schedule's level nearest the start
    for kind in ("shape", "colour"):
        r = result["kinds"][kind]
        assert r["appearances"] > 0
        assert 0 <= r["follows_caption"] <= 1 and 0 <= r["keeps_drawing"] <= 1
        nc = r["follows_caption_not_circle"]
        assert (nc is None) == (kind == "colour") and r["appearances_not_circle"] <= r["appearances"]
        assert nc is None or 0 <= nc <= 1
    out = main(["--model", str(folder), "--stories", "1", "--kinds", "shape", "--guidance", "1",
                "--json", str(tmp_path / "p.json")])
    assert (tmp_path / "p.json").is_file() and list(out["kinds"]) == ["shape"] and out["guidance"] == 1.0
    with pytest.raises(SystemExit):
        main(["--model", str(folder), "--guidance", "0.5"])
    with pytest.raises(SystemExit):
        main(["--model", str(folder), "--kinds", "size"])
    with pytest.raises(SystemExit):
        main(["--model", str(folder), "--codec-noise", "-1"])


def test_codec_noise_scores_the_codec_alone(tmp_path):
    """The pixel codec of a tiny model: more latent noise never keeps more looks in the ladder's
    first rung than none does (the pixel codec keeps colour: its latents are the pooled pixels)."""
    folder = write_default_model(tmp_path / "tiny", seed=3, transformer=TINY_TRANSFORMER)
    got = main(["--model", str(folder), "--stories", "1", "--codec-noise", "0,3"])["codec_noise"]
    assert set(got) == {"0.0", "3.0"} and got["0.0"]["appearances"] > 0
    assert got["0.0"]["ladder"]["colour"] >= got["3.0"]["ladder"]["colour"]
