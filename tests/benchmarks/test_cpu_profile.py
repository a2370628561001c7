"""benchmarks/cpu_profile.py on a tiny model: the render's parts are found and add up."""

import json

from benchmarks.cpu_profile import main
from engine.default_model import write_default_model
from engine.story import GenerationSettings, Shot, Story


def test_the_profile_splits_a_render_into_its_parts(tmp_path):
    model = write_default_model(tmp_path / "model", seed=1, transformer=dict(
        num_attention_heads=2, attention_head_dim=12, num_layers=2, ffn_dim=32, freq_dim=32))
    story = Story("A story on the sky.", [Shot("Kip, a small red circle, bounces.", 2, 1), Shot("Kip moves left.", 2, 2)],
                  GenerationSettings(steps=2, guidance=2.0, height=32, width=48)).validate()
    story.save(tmp_path / "story.json")
    assert main(["--story", str(tmp_path / "story.json"), "--model", str(model), "--json", str(tmp_path / "p.json")]) == 0
    result = json.loads((tmp_path / "p.json").read_text())
    split = result["render_split_s"]
    assert result["attention_calls"] == 2 * 2  # one call per layer per step (guidance batched)
    assert split["self-attention, routing excluded"] > 0 and split["MoC routing"] > 0 and split["decoding"] > 0
    assert abs(sum(split.values()) - result["render_s"]) < 1e-2
    assert set(result["phases_s"]) == {"import torch", "import diffusers", "import engine", "load model and text encoder"}
