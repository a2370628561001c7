"""The default model's trainer on a tiny configuration (CPU): the loss falls, a run resumes from
its checkpoint, and the exported folder loads and renders like the shipped model."""

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine.shapestory.world import HELDOUT_SEED_START, is_heldout_name, sample_story
from engine.trainer import (TrainerConfig, _prepare, _text, codec_scores, export_model, story_batch_plan, train,
                            training_config)
from engine.training import draw_shot_sigmas

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import train_default  # noqa: E402
from train_default import _frames_choices, tiny_config  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _tiny(**kw) -> TrainerConfig:
    return replace(tiny_config(TrainerConfig()), codec_steps=20, sample_minutes=1e9, log_every=1, **kw)


def _log(work: Path) -> list[dict]:
    return [json.loads(line) for line in (work / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run of 60 steps, resumed once (25 + 35 steps), and its export."""
    work = tmp_path_factory.mktemp("train")
    train(_tiny(max_steps=25), work, "cpu")
    first = json.loads((work / "ckpt" / "state.json").read_text())
    train(_tiny(max_steps=60), work, "cpu")
    out = export_model(_tiny(), work, work / "model")
    return work, first, out


def test_batches_use_training_seeds_and_names_only():
    config = TrainerConfig()
    for step in range(1, 30):
        specs, shots, frames = story_batch_plan(config, step)
        assert all(s.seed < HELDOUT_SEED_START and len(s.shots) == shots and s.frames == frames for s in specs)
        assert not any(is_heldout_name(c.name) for s in specs for c in s.characters)
        assert len(specs) * shots * frames * 96 <= config.tokens_per_step or len(specs) == 1
    assert story_batch_plan(config, 5)[0] == story_batch_plan(config, 5)[0]  # a step's data is fixed


def test_focus_stories_have_one_character_and_more_close_ups():
    """--focus: that share of a step's stories has one character, framed close more often; the
    default draws the same stories as before the option existed (focus 0 draws nothing extra)."""
    def close_share(specs):
        shots = [sh for s in specs for sh in s.shots if len(sh.appearances) <= 2]
        return sum(sh.framing == "close" for sh in shots) / len(shots)
    plain = [s for step in range(1, 40) for s in story_batch_plan(TrainerConfig(), step)[0]]
    focused = [s for step in range(1, 40) for s in story_batch_plan(replace(TrainerConfig(), focus=1.0), step)[0]]
    assert all(len(s.characters) == 1 for s in focused)
    assert not all(len(s.characters) == 1 for s in plain)
    assert close_share(focused) > close_share(plain) + 0.2
    assert all(s.seed < HELDOUT_SEED_START for s in focused)
    half = [s for step in range(1, 40) for s in story_batch_plan(replace(TrainerConfig(), focus=0.5), step)[0]]
    lone = sum(len(s.characters) == 1 for s in half) / len(half)
    assert 0.45 < lone < 0.85  # half focus stories, plus the plain ones that drew one character
    # a story's framings follow close_up; everything else about it is the same draw
    a = sample_story(123, num_shots=6, close_up=0.0)
    b = sample_story(123, num_shots=6, close_up=1.0)
    assert all(sh.framing == "wide" for sh in a.shots) and any(sh.framing == "close" for sh in b.shots)
    assert a.characters == b.characters and a.world == b.world
    with pytest.raises(ValueError, match="close_up"):
        sample_story(1, close_up=1.5)
    with pytest.raises(SystemExit):
        train_default.main(["--work", "/tmp/unused", "--focus", "2"])


def test_frames_per_shot_come_from_the_configured_choices():
    """--frames-choices (run 5 trained on 3,4,6,8,8): every step draws its frames per shot from
    them, and a bad list is refused with the flag's name."""
    config = replace(TrainerConfig(), frames_choices=_frames_choices("3,4,6,8,8"))
    drawn = {story_batch_plan(config, step)[2] for step in range(1, 200)}
    assert drawn == {3, 4, 6, 8}
    for bad in ("", "3,x", "0,4"):
        with pytest.raises(SystemExit, match="--frames-choices"):
            _frames_choices(bad)


def test_the_training_shift_sets_where_the_noise_levels_fall():
    """train_shift reaches the loss: 3 (the default) puts about 3/4 of the levels above 0.5, 1 half."""
    g = torch.Generator().manual_seed(0)
    for shift, above in ((3.0, 0.75), (1.0, 0.5)):
        tcfg = training_config(replace(TrainerConfig(), train_shift=shift), "cpu")
        assert tcfg.shift == shift and tcfg.backend == "reference"
        sigmas = draw_shot_sigmas(4000, 1, tcfg, g)
        assert float((sigmas > 0.5).float().mean()) == pytest.approx(above, abs=0.03)


def test_loss_falls_and_the_run_resumes(trained):
    work, first, _ = trained
    log = _log(work)
    steps = [r["step"] for r in log if r["stage"] == "transformer"]
    assert first["step"] == 25 and steps == list(range(1, 61))  # the second run went on from 26
    losses = [r["loss"] for r in log if r["stage"] == "transformer"]
    # the tiny model learns the latents' statistics quickly (about 2.6 -> 2.2), then slowly
    assert sum(losses[-15:]) / 15 < 0.92 * sum(losses[:3]) / 3
    assert all(torch.isfinite(torch.tensor(losses)))
    codec = [json.loads(line) for line in (work / "codec_log.jsonl").read_text().splitlines()]
    assert codec[0]["step"] == 1 and (work / "codec_reconstructions.png").stat().st_size > 0


def test_export_loads_and_renders(trained, tmp_path):
    from engine.engine import StoryEngine
    from engine.model import StoryModel
    from engine.shot_cache import ShotCache
    from engine.story import GenerationSettings, Shot, Story
    _, _, out = trained
    manifest = json.loads((out / "storyboard.json").read_text())
    assert manifest["trained"] and manifest["codec"]["type"] == "frame-vae"
    assert manifest["training"]["transformer_steps"] == 60
    shards = list(out.rglob("*.safetensors"))
    assert shards and not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))
    model = StoryModel.load(out, device="cpu")
    assert model.trained
    story = Story("A story on the sky.", [Shot("Kip, a small red circle, bounces.", 2, 1),
                                          Shot("Kip moves left.", 3, 2)],
                  GenerationSettings(steps=2, guidance=2.0, height=32, width=48)).validate()
    result = StoryEngine(model, ShotCache(tmp_path / "shots"), tmp_path).render(story, out_dir=tmp_path / "out")
    assert [s.status for s in result.shots] == ["generated", "generated"]
    engine = StoryEngine(model, ShotCache(tmp_path / "shots"), tmp_path)
    frames = engine.cache.get(result.shots[1].key).frames
    assert tuple(frames.shape) == (3, 32, 48, 3) and frames.dtype == torch.uint8
    assert frames.float().std() > 1  # a picture, not a constant


def test_every_checkpoint_leaves_a_loadable_model_to_warm_start_from(tmp_path):
    from engine.model import StoryModel
    train(_tiny(max_steps=3, checkpoint_minutes=0.0), tmp_path / "run", "cpu")
    latest = tmp_path / "run" / "model_latest"
    assert StoryModel.load(latest, device="cpu").trained
    train(_tiny(max_steps=2), tmp_path / "warm", "cpu", init_from=latest)  # a new run starts from it
    assert json.loads((tmp_path / "warm" / "ckpt" / "state.json").read_text())["step"] == 2


class _Identity:
    """A perfect codec: frames pass through unchanged."""
    def encode(self, frames):
        return frames.clone()

    def decode(self, latents):
        return latents


class _Grey(_Identity):
    """A codec that loses everything: every frame comes back mid-grey."""
    def decode(self, latents):
        return torch.full_like(latents, 128)


def test_codec_scores_tell_a_perfect_codec_from_a_lossy_one():
    perfect, grey = codec_scores(_Identity(), 2), codec_scores(_Grey(), 2)
    assert perfect["appearances"] == grey["appearances"] > 0
    assert perfect["look_ok"] == 1.0 and perfect["psnr_db"] > 80
    assert grey["look_ok"] == 0.0 and grey["psnr_db"] < 20


def test_a_codec_below_the_gate_stops_the_run_before_the_transformer(tmp_path):
    with pytest.raises(RuntimeError, match="below the gate 1.01"):
        train(_tiny(max_steps=1, codec_gate=1.01), tmp_path, "cpu")  # no codec keeps more than all looks
    check = json.loads((tmp_path / "codec" / "codec.json").read_text())["check"]
    assert 0.0 <= check["look_ok"] <= 1.0 and check["appearances"] > 0
    assert not (tmp_path / "ckpt").exists()  # the transformer never started
    with pytest.raises(RuntimeError, match="below the gate"):  # a resumed run keeps the codec and the verdict
        train(_tiny(max_steps=1, codec_gate=1.01), tmp_path, "cpu")


def test_a_run_reuses_an_exported_codec_and_scores_it_again(trained, tmp_path):
    from safetensors.torch import load_file
    work, _, out = trained
    train(_tiny(max_steps=1), tmp_path / "reuse", "cpu", codec_from=out)
    log = (tmp_path / "reuse" / "codec_log.jsonl")
    assert not log.exists()  # no codec step was trained
    mine, theirs = load_file(tmp_path / "reuse" / "codec" / "vae.safetensors"), load_file(work / "codec" / "vae.safetensors")
    assert mine.keys() == theirs.keys()
    assert all(torch.allclose(mine[k], theirs[k], rtol=1e-3, atol=1e-4) for k in mine)  # fp16 export, read back
    meta = json.loads((tmp_path / "reuse" / "codec" / "codec.json").read_text())
    before = json.loads((work / "codec" / "codec.json").read_text())
    assert meta["from"] == str(out) and meta["steps"] == before["steps"] and meta["latent_mean"] == before["latent_mean"]
    assert meta["check"]["appearances"] == before["check"]["appearances"]
    assert json.loads((out / "storyboard.json").read_text())["training"]["codec_check"] == before["check"]
    with pytest.raises(RuntimeError, match="Error"):  # a codec of another shape does not load
        other = replace(_tiny(max_steps=1), vae={**_tiny().vae, "block_out_channels": (8, 16, 16)})
        train(other, tmp_path / "other", "cpu", codec_from=out)


def test_the_command_trains_another_architecture_and_exports_it(tmp_path):
    """--transformer changes the backbone's config (run 7 compared 2 x 2 patches with the default's
    4 x 4): the run trains it from scratch, the export carries it and loads; bad changes are refused."""
    import argparse

    from engine.model import StoryModel
    from train_default import _transformer_overrides, main
    main(["--work", str(tmp_path / "run"), "--tiny", "--device", "cpu", "--codec-steps", "5", "--max-steps", "2",
          "--transformer", '{"patch_size": [1, 2, 2], "num_layers": 3}', "--export", str(tmp_path / "model")])
    config = json.loads((tmp_path / "model" / "transformer" / "config.json").read_text())
    assert config["patch_size"] == [1, 2, 2] and config["num_layers"] == 3
    model = StoryModel.load(tmp_path / "model", device="cpu")
    assert tuple(model.transformer.patch_size) == (1, 2, 2)
    with pytest.raises(argparse.ArgumentTypeError, match="unknown config keys"):
        _transformer_overrides('{"patch": 2}')
    with pytest.raises(argparse.ArgumentTypeError, match="JSON object"):
        _transformer_overrides("[1, 2, 2]")


def test_the_look_probe_trains_beside_the_model_and_stays_out_of_the_export(tmp_path):
    """--look-weight: the log records the probe's losses, the checkpoint keeps its head for a
    resume, the exported model is the plain Wan transformer; a bad layer is refused."""
    from engine.model import StoryModel
    from engine.trainer import make_look_probe
    work = tmp_path / "run"
    train(_tiny(max_steps=6, look_weight=1.0, look_layer=1), work, "cpu")
    assert (work / "ckpt" / "look_probe.safetensors").is_file()
    train(_tiny(max_steps=10, look_weight=1.0, look_layer=1), work, "cpu")  # resumes with the probe
    rows = [r for r in _log(work) if r["stage"] == "transformer"]
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert all(r["look_shape_ce"] > 0 and r["look_colour_mse"] >= 0 for r in rows)
    for r in rows:  # the logged loss is the flow loss plus the probe's (weight 1)
        assert r["loss"] == pytest.approx(r["flow_loss"] + r["look_shape_ce"] + r["look_colour_mse"], abs=2e-4)
        assert 0 < r["flow_loss"] < r["loss"]
    out = export_model(_tiny(), work, work / "model")
    keys = [k for f in out.rglob("*.safetensors") for k in __import__("safetensors.torch", fromlist=["load_file"]).load_file(f)]
    assert keys and not any("look" in k or k.startswith("head") for k in keys)
    assert StoryModel.load(out, device="cpu").trained
    with pytest.raises(ValueError, match="look_layer"):
        make_look_probe(_tiny(look_weight=1.0, look_layer=2), "cpu")  # the tiny transformer has 2 blocks
    assert make_look_probe(_tiny(), "cpu") is None
    with pytest.raises(SystemExit, match="--look-layer"):
        train_default.main(["--work", str(tmp_path / "x"), "--tiny", "--look-weight", "1", "--look-layer", "5"])
    with pytest.raises(SystemExit, match="--look-weight"):
        train_default.main(["--work", str(tmp_path / "x"), "--tiny", "--look-weight", "-1"])


def test_the_routing_probe_trains_with_the_run_and_is_logged(tmp_path):
    """--route-weight: every log record carries the probe's cross-entropy, and the logged loss is
    the flow loss plus the weighted probes; bad settings are refused before any training."""
    from engine.trainer import make_route_probe
    work = tmp_path / "run"
    train(_tiny(max_steps=4, route_weight=0.5, look_weight=1.0, look_layer=1), work, "cpu")
    rows = [r for r in _log(work) if r["stage"] == "transformer"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert any(r["route_ce"] > 0 for r in rows)  # 0 where no character of the batch comes back
    for r in rows:
        assert r["route_ce"] >= 0
        assert r["loss"] == pytest.approx(r["flow_loss"] + r["look_shape_ce"] + r["look_colour_mse"]
                                          + 0.5 * r["route_ce"], abs=2e-4)
    assert make_route_probe(_tiny()) is None
    assert make_route_probe(_tiny(route_weight=1.0, route_layers=(1,))).layers == (1,)
    assert make_route_probe(_tiny(route_weight=1.0)).layers is None  # every block
    with pytest.raises(ValueError, match="route layers"):
        make_route_probe(_tiny(route_weight=1.0, route_layers=(2,)))  # the tiny transformer has 2 blocks
    with pytest.raises(ValueError, match="MoC"):
        make_route_probe(_tiny(route_weight=1.0, moc=False))
    with pytest.raises(SystemExit, match="--route-layers"):
        train_default.main(["--work", str(tmp_path / "x"), "--tiny", "--route-weight", "1", "--route-layers", "0,5"])
    with pytest.raises(SystemExit, match="--route-weight"):
        train_default.main(["--work", str(tmp_path / "x"), "--tiny", "--route-weight", "-1"])
    with pytest.raises(SystemExit):
        train_default.main(["--work", str(tmp_path / "x"), "--tiny", "--route-layers", "a,b"])


def test_regeneration_steps_are_drawn_per_step_without_changing_the_stories():
    """open_shot_of: None for one-shot stories and with the share 0; otherwise about that share of
    steps, each a shot with a later one, the same for the same (seed, step); the stories a step
    draws do not depend on it."""
    from engine.trainer import open_shot_of
    config = replace(TrainerConfig(), open_shot=0.3)
    drawn = [open_shot_of(config, step, 5) for step in range(2000)]
    opened = [d for d in drawn if d is not None]
    assert 0.25 < len(opened) / len(drawn) < 0.35
    assert set(opened) == {0, 1, 2, 3}  # every shot that has a later one, never the last
    assert drawn == [open_shot_of(config, step, 5) for step in range(2000)]
    assert all(open_shot_of(config, step, 1) is None for step in range(200))
    assert all(open_shot_of(TrainerConfig(), step, 5) is None for step in range(200))
    plain = [story_batch_plan(TrainerConfig(), step) for step in range(5)]
    assert [story_batch_plan(config, step) for step in range(5)] == plain


def test_a_run_with_regeneration_steps_trains_and_logs_them(tmp_path):
    """--open-shot 1: every multi-shot step is a regeneration step (logged as open_steps); the
    dense baseline refuses it before any training."""
    work = tmp_path / "run"
    train(_tiny(max_steps=3, open_shot=1.0), work, "cpu")
    rows = [r for r in _log(work) if r["stage"] == "transformer"]
    assert [r["step"] for r in rows] == [1, 2, 3] and any(r["shots"] > 1 for r in rows)
    for r in rows:
        assert r["open_steps"] == (1 if r["shots"] > 1 else 0)
        assert r["loss"] > 0
    with pytest.raises(SystemExit, match="--open-shot"):
        train_default.main(["--work", str(tmp_path / "x"), "--tiny", "--open-shot", "0.5", "--dense"])
    with pytest.raises(ValueError, match="MoC"):
        from engine.trainer import training_config
        training_config(_tiny(open_shot=0.5, moc=False), "cpu")


def test_a_step_prepared_ahead_carries_the_captions_token_states():
    """The worker thread prepares step n + 1 with its own encoder: the same stories and captions
    as without one, and the captions' states as the training thread's encoder gives them."""
    from engine.text import MiniLMEncoder
    config = _tiny()
    text = MiniLMEncoder.load("cpu")
    *plain, captions, _ = _prepare(config, 3)
    *ahead, captions_ahead, states = _prepare(config, 3, text.for_another_thread())
    assert captions_ahead == captions and [s.seed for s in ahead[0]] == [s.seed for s in plain[0]]
    want = _text(text, captions)
    assert [len(story) for story in states] == [len(story) for story in want]
    for story, expected in zip(states, want):
        for a, b in zip(story, expected):
            torch.testing.assert_close(a, b)


def test_min_lr_ratio_sets_where_the_cosine_ends(monkeypatch, capsys):
    """--min-lr-ratio: the decay ends at that fraction of --lr (a run split over two machines ends
    its first leg high, the second starts there); out of range is refused with the flag's name."""
    import engine.trainer
    from engine.trainer import _lr_at
    seen = {}
    monkeypatch.setattr(engine.trainer, "train", lambda config, *a, **k: seen.setdefault("config", config))
    train_default.main(["--work", "/tmp/unused", "--lr", "2e-4", "--warmup", "10", "--minutes", "10",
                        "--min-lr-ratio", "0.5"])
    config = seen["config"]
    assert config.min_lr_ratio == 0.5
    assert _lr_at(config, 100, 10 * 60) == pytest.approx(1e-4)
    assert _lr_at(config, 100, 5 * 60) == pytest.approx(1.5e-4)
    assert _lr_at(config, 5, 0.0) == pytest.approx(1e-4)  # warm-up
    assert _lr_at(replace(config, min_lr_ratio=0.1), 100, 10 * 60) == pytest.approx(2e-5)
    with pytest.raises(SystemExit):
        train_default.main(["--work", "/tmp/unused", "--min-lr-ratio", "1.5"])
    assert "--min-lr-ratio" in capsys.readouterr().err
