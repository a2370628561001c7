"""The quality benchmark: the routing-follows-the-story numbers on hand-built cases (exact), the
routing counts it reads from a real MoC render (causal, top-k, forced links excluded), and one
end-to-end run of its CLI on a tiny random model (JSON layout, summary ranges, targets)."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from benchmarks.quality import (BenchConfig, main, moc_backend, render, routed_by_shot, routing_follows_story,
                                score_frames, story_settings)
from engine.default_model import write_default_model
from engine.model import StoryModel
from engine.moc import MoCConfig, Selection, TokenLayout, forced_links
from engine.routing_report import RoutingRecorder
from engine.shapestory.world import (HELDOUT_SEED_START, Appearance, Character, ShotSpec, StorySpec, sample_story,
                                    to_story)

TINY_TRANSFORMER = dict(num_attention_heads=2, attention_head_dim=12, num_layers=2, ffn_dim=32, freq_dim=32)
FRACTIONS = ("adherence", "identity", "identity_no_global", "background", "smoothness", "sparsity_8_shots")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return write_default_model(tmp_path_factory.mktemp("tiny_model"), seed=1, transformer=TINY_TRANSFORMER)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    return StoryModel.load(tiny_model_dir, device="cpu")


def hand_spec() -> StorySpec:
    """Kip enters in shot 0, Mo in shot 1; shot 2 names Mo, shot 3 names Kip, shot 4 names both
    without their looks; shot 5 has Kip described (not counted)."""
    chars = (Character("Kip", "red", "circle", "big"), Character("Mo", "blue", "square", "small"))

    def shot(*apps):
        return ShotSpec("caption", "wide", tuple(Appearance(c, "still", 0.5, 0.5, d) for c, d in apps))
    shots = (shot((0, True)), shot((1, True)), shot((1, False)), shot((0, False)), shot((0, False), (1, False)),
             shot((0, True)))
    return StorySpec(seed=0, world="sky", pattern="none", global_caption="Shapes.", characters=chars, shots=shots,
                     frames=8)


def test_routing_follows_story_by_hand():
    spec = hand_spec()
    routed = np.zeros((6, 6))
    routed[2, :3] = [4, 12, 500]  # shot 2 (Mo): own-shot counts never enter; 12 of 16 into shot 1
    routed[3, :4] = [60, 20, 20, 900]  # shot 3 (Kip): 60 of 100 into shot 0
    routed[4, :4] = [10, 30, 40, 20]  # shot 4 (Kip, Mo): Kip in shots 0, 3 -> 30/100; Mo in 1, 2 -> 70/100
    rows = {e["shot"]: e for e in routing_follows_story(spec, routed, [8] * 6, top_k=5)}
    assert sorted(rows) == [2, 3, 4]  # shots naming a known character without its look
    assert rows[2]["share"] == pytest.approx(0.75) and rows[2]["chance"] == pytest.approx(0.5)
    assert rows[2]["share_over_chance"] == pytest.approx(1.5)
    assert rows[3]["share"] == pytest.approx(0.6) and rows[3]["chance"] == pytest.approx(1 / 3)
    assert rows[3]["share_over_chance"] == pytest.approx(1.8)
    assert rows[4]["characters"] == ["Kip", "Mo"]
    assert rows[4]["share"] == pytest.approx((0.3 + 0.7) / 2) and rows[4]["chance"] == pytest.approx(0.5)
    assert rows[4]["share_over_chance"] == pytest.approx((0.6 + 1.4) / 2)


def test_routing_follows_story_without_choice():
    """No score where routing cannot choose: the character is in every earlier shot, at most
    top_k chunks are routable, or nothing was routed."""
    spec = hand_spec()
    routed = np.ones((6, 6))
    assert routing_follows_story(spec, routed, [2] * 6, top_k=5)[0]["share"] is None  # shot 2: 4 routable chunks
    assert routing_follows_story(spec, routed, [3] * 6, top_k=5)[0]["share"] is not None  # 6 routable chunks
    assert routing_follows_story(spec, np.zeros((6, 6)), [8] * 6, top_k=5)[0]["share"] is None
    only_kip = dataclasses.replace(spec, shots=(spec.shots[0], spec.shots[3]))
    assert routing_follows_story(only_kip, routed, [8] * 2, top_k=5)[0]["share"] is None  # chance would be 1


def test_routed_by_shot_reads_routed_selections_only():
    """A hand-built Selection through the RoutingRecorder: forced own-shot links never count."""
    layout = TokenLayout(frame_tokens=2, shot_frames=(2, 2, 2))  # 3 shots x 2 frames x 2 tokens, chunk = frame
    config = MoCConfig(top_k=2)
    routed = torch.full((1, 1, 12, 2), -1, dtype=torch.int32)  # (B, H, Nq, R)
    routed[0, 0, 4:8] = torch.tensor([0, 1], dtype=torch.int32)  # shot 1's tokens -> frames 0, 1 (shot 0)
    routed[0, 0, 8:12] = torch.tensor([0, 2], dtype=torch.int32)  # shot 2's tokens -> frame 0 (shot 0), 2 (shot 1)
    selection = Selection.build(layout, config.tile, forced_links(layout, config), routed, 0)
    recorder = RoutingRecorder(layout, [0, 1, 2], 0, num_layers=2, num_heads=1, steps=1)
    recorder.begin_step(0)
    for layer in range(2):
        recorder.record(layer, selection, head_dim=4)
    expected = np.array([[0, 0, 0], [16, 0, 0], [8, 8, 0]])  # 4 tokens x 2 slots x 2 layers
    np.testing.assert_array_equal(routed_by_shot([recorder], 3), expected)


@pytest.mark.parametrize("mode", ["joint", "shot_by_shot"])
def test_render_routes_causally_with_top_k(tiny_model, mode):
    """Real MoC sampling: shot s routes only into shots < s, min(top_k, routable chunks) per query."""
    model = tiny_model
    config = BenchConfig(steps=2, height=32, width=48, frames=3)
    spec = sample_story(5, num_shots=3, frames=3)
    story = to_story(spec, **story_settings("moc", mode, moc_backend(model)[0], config))
    rendered = render(model, story)
    assert len(rendered.frames) == 3 and rendered.frames[0].shape == (3, 32, 48, 3)
    assert rendered.shot_chunks == [3, 3, 3]
    tr = model.transformer
    # one routed chunk per (query token, head, guidance batch entry, layer, recorded step)
    per_pick = 3 * tr.frame_tokens(4, 6) * tr.num_heads * 2 * tr.num_layers * 2
    k = story.settings.moc.top_k
    expected = np.array([[0, 0, 0], [per_pick * 3, 0, 0], [0, 0, 0]], dtype=float)
    np.testing.assert_array_equal(np.triu(rendered.routed), 0)
    np.testing.assert_array_equal(rendered.routed[:2], expected[:2])
    assert rendered.routed[2].sum() == per_pick * min(k, 6)


@pytest.mark.slow
def test_benchmark_end_to_end(tiny_model_dir, tmp_path):
    out = tmp_path / "quality.json"
    result = main(["--model", str(tiny_model_dir), "--stories", "3", "--steps", "2", "--height", "32",
                   "--width", "48", "--frames", "3", "--device", "cpu", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["summary"] == json.loads(json.dumps(result["summary"]))
    summary = saved["summary"]
    for variant in ("moc", "dense", "isolated"):
        parts = [summary[variant]] + [summary["by_mode"][mode][variant] for mode in ("joint", "shot_by_shot")]
        for part in parts:
            for key in FRACTIONS:
                assert part[key] is None or 0.0 <= part[key] <= 1.0, (variant, key, part[key])
            assert "routing_share_over_chance" in part
    assert summary["moc"]["routing_share_over_chance"] > 0  # the 8-shot story has shots to score
    assert summary["dense"]["sparsity_8_shots"] == 0.0 and summary["moc"]["sparsity_8_shots"] > 0.3
    names = [t["target"] for t in saved["targets"]]
    assert names == ["moc adherence", "moc identity", "moc vs dense", "memory gain", "routing follows the story",
                     "sparsity, 8 shots"]
    assert all(t["pass"] in (True, False) for t in saved["targets"])
    assert saved["config"]["stories"] == 3 and len(saved["config"]["seeds"]) == 3
    assert [row["num_shots"] for row in saved["stories"]] == [8, 2, 3]
    assert all(len(row["runs"]) == 6 for row in saved["stories"])
    assert 0.0 <= saved["codec_check"]["look_ok"] <= 1.0
    assert all(r["seconds"] >= 0 for row in saved["stories"] for r in row["runs"])


def test_memory_experiments_end_to_end(tiny_model_dir, tmp_path):
    """--memory regenerates each story's middle shot three ways (four with --open-top-k) and pools
    identity; on a random model the numbers mean nothing, so this checks the layout, ranges and
    what was pinned."""
    out = tmp_path / "memory.json"
    main(["--model", str(tiny_model_dir), "--stories", "6", "--steps", "2", "--height", "32", "--width", "48",
          "--frames", "3", "--device", "cpu", "--modes", "shot_by_shot", "--variants", "moc", "--memory",
          "--open-top-k", "2", "--json", str(out)])
    saved = json.loads(out.read_text())
    memory = saved["summary"]["memory"]
    entries = [row["memory"] for row in saved["stories"] if row.get("memory")]
    assert memory["stories"] == len(entries) >= 1
    assert memory["appearances"] == sum(len(e["earlier_only"]) for e in entries) >= 1
    for key in ("identity_earlier_only", "identity_both_sides", "identity_pinned"):
        assert 0.0 <= memory[key] <= 1.0
    for row in saved["stories"]:
        if row.get("memory"):
            e = row["memory"]
            assert e["shot"] == row["num_shots"] // 2 and all(p < e["shot"] for p in e["pins"])
            assert len(e["earlier_only"]) == len(e["both_sides"]) == len(e["pinned"]) == len(e["later_right"])
            assert len(e["both_sides_split"]) == len(e["earlier_only"]) and e["open_top_k"] == 2
            assert all(r in (True, False, None) for r in e["later_right"])
    assert saved["config"]["open_top_k"] == 2
    four = memory["both_sides_split"]
    assert four["open_top_k"] == [2] and four["appearances"] == memory["appearances"]
    assert four["identity_earlier_only"] == memory["identity_earlier_only"] and 0.0 <= four["identity"] <= 1.0
    split = memory["both_sides_by_later_shots"]
    assert sum(v["appearances"] for v in split.values()) == memory["appearances"]
    assert sum(v["both_sides"] for v in split.values()) == round(memory["identity_both_sides"] * memory["appearances"])


def test_the_memory_summary_splits_both_sides_by_what_the_later_shots_show():
    from benchmarks.quality import summarise_memory
    rows = [{"memory": {"earlier_only": [True, False, False], "both_sides": [False, True, False],
                        "pinned": [True, True, False], "later_right": [True, False, None]}},
            {"memory": {"earlier_only": [True], "both_sides": [True], "pinned": [False], "later_right": [False]}},
            {"memory": {"earlier_only": [False], "both_sides": [True], "pinned": [True]}},  # written before the split
            {"memory": None}]
    m = summarise_memory(rows)
    assert m["stories"] == 3 and m["appearances"] == 5
    assert m["identity_both_sides"] == pytest.approx(3 / 5) and m["identity_earlier_only"] == pytest.approx(2 / 5)
    assert m["missed_by_routing"] == 3 and m["identity_pinned_where_missed"] == pytest.approx(2 / 3)
    split = m["both_sides_by_later_shots"]
    assert split["later_right"] == {"appearances": 1, "both_sides": 0, "earlier_only": 1}
    assert split["later_wrong"] == {"appearances": 2, "both_sides": 2, "earlier_only": 1}
    assert split["not_later"] == {"appearances": 1, "both_sides": 0, "earlier_only": 0}
    assert "both_sides_split" not in m  # no story ran the fourth way
    rows[1]["memory"].update(both_sides_split=[False], open_top_k=2)
    four = summarise_memory(rows)["both_sides_split"]
    assert four == {"open_top_k": [2], "appearances": 1, "identity": 0.0, "identity_earlier_only": 1.0,
                    "identity_both_sides": 1.0}


def test_shards_merge_into_the_whole_run(tiny_model_dir, tmp_path):
    """Two shards (--shard 0/2, 1/2) merged with --merge give the unsharded run's rows and summary;
    overlapping shards are refused."""
    common = ["--model", str(tiny_model_dir), "--stories", "3", "--steps", "2", "--height", "32", "--width", "48",
              "--frames", "2", "--device", "cpu", "--modes", "shot_by_shot", "--variants", "moc,isolated"]
    whole = main(common + ["--json", str(tmp_path / "whole.json")])
    for i in range(2):
        main(common + ["--shard", f"{i}/2", "--json", str(tmp_path / f"part{i}.json")])
    assert len(json.loads((tmp_path / "part0.json").read_text())["stories"]) == 2
    merged = main(["--merge", str(tmp_path / "part1.json"), str(tmp_path / "part0.json"),
                   "--json", str(tmp_path / "merged.json")])
    assert merged["config"]["seeds"] == whole["config"]["seeds"]
    strip = lambda rows: [{k: v for k, v in row.items() if k != "runs"} for row in rows]  # noqa: E731
    assert strip(merged["stories"]) == strip(whole["stories"])
    for mw, mm in zip(whole["stories"], merged["stories"]):
        assert [{k: v for k, v in r.items() if "seconds" not in k} for r in mw["runs"]] == \
               [{k: v for k, v in r.items() if "seconds" not in k} for r in mm["runs"]]
    drop = lambda s: {v: {k: x for k, x in s[v].items() if "seconds" not in k} for v in ("moc", "isolated")}  # noqa: E731
    assert drop(merged["summary"]) == drop(whole["summary"])
    with pytest.raises(ValueError, match="overlap"):
        main(["--merge", str(tmp_path / "part0.json"), str(tmp_path / "whole.json")])
    # a later run of further stories (another seed offset) pools with it; other settings do not
    more = main(common + ["--stories", "1", "--seed-offset", "3", "--json", str(tmp_path / "more.json")])
    pooled = main(["--merge", str(tmp_path / "whole.json"), str(tmp_path / "more.json")])
    assert pooled["config"]["seeds"] == whole["config"]["seeds"] + more["config"]["seeds"]
    assert pooled["config"]["seed_offsets"] == [0, 3] and pooled["config"]["stories"] == 4
    other = main(common + ["--stories", "1", "--seed-offset", "4", "--steps", "1", "--json", str(tmp_path / "other.json")])
    with pytest.raises(ValueError, match="steps"):
        main(["--merge", str(tmp_path / "whole.json"), str(tmp_path / "other.json")])
    assert other["config"]["steps"] == 1


def test_top_k_and_context_noise_reach_the_stories_and_keep_runs_apart(tiny_model, tiny_model_dir, tmp_path):
    """--top-k and --context-noise set the rendered stories' MoC top-k and context noise (dense keeps
    attention dense), are recorded in the JSON, and runs that differ in them do not merge."""
    config = BenchConfig(top_k=2, context_noise=0.6)
    moc = to_story(sample_story(5, num_shots=3, frames=2), **story_settings("moc", "shot_by_shot", "auto", config))
    dense = to_story(sample_story(5, num_shots=3, frames=2), **story_settings("dense", "joint", "auto", config))
    assert moc.settings.moc.top_k == 2 and moc.settings.context_noise == 0.6 and moc.settings.moc.enabled
    assert not dense.settings.moc.enabled
    default = to_story(sample_story(5, num_shots=3, frames=2), **story_settings("moc", "joint", "auto", BenchConfig()))
    assert default.settings.moc.top_k == MoCConfig().top_k and default.settings.context_noise == 0.25
    common = ["--model", str(tiny_model_dir), "--steps", "1", "--height", "32", "--width", "48", "--frames", "2",
              "--device", "cpu", "--modes", "shot_by_shot", "--variants", "moc", "--stories", "1"]
    base = main(common + ["--json", str(tmp_path / "base.json")])
    assert base["config"]["moc"]["top_k"] == MoCConfig().top_k and base["config"]["context_noise"] == 0.25
    for flag, value, name in (("--top-k", "1", "top_k"), ("--context-noise", "0.5", "context_noise")):
        other = main(common + [flag, value, "--seed-offset", "1", "--json", str(tmp_path / f"{name}.json")])
        assert str(other["config"]["moc"]["top_k"] if name == "top_k" else other["config"][name]) == value
        with pytest.raises(ValueError, match=name):
            main(["--merge", str(tmp_path / "base.json"), str(tmp_path / f"{name}.json")])
    # a run recorded before context_noise was written down ran at the default and still pools
    old = json.loads((tmp_path / "base.json").read_text())
    del old["config"]["context_noise"]
    old["config"]["seeds"] = [s + 7 for s in old["config"]["seeds"]]
    for row in old["stories"]:
        row["seed"] += 7
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert main(["--merge", str(tmp_path / "base.json"), str(tmp_path / "old.json")])["config"]["stories"] == 2


def test_runs_of_other_variants_join_on_their_common_stories(tiny_model_dir, tmp_path):
    """--variants moc and --variants isolated run apart (two GPU calls) and merged equal one run of
    both on the stories both finished; runs sharing a variant are refused."""
    common = ["--model", str(tiny_model_dir), "--steps", "2", "--height", "32", "--width", "48",
              "--frames", "2", "--device", "cpu", "--modes", "joint"]
    whole = main(common + ["--stories", "3", "--variants", "moc,isolated", "--json", str(tmp_path / "whole.json")])
    main(common + ["--stories", "2", "--variants", "moc", "--json", str(tmp_path / "moc.json")])
    main(common + ["--stories", "3", "--variants", "isolated", "--json", str(tmp_path / "iso.json")])
    joined = main(["--merge", str(tmp_path / "iso.json"), str(tmp_path / "moc.json"),
                   "--json", str(tmp_path / "joined.json")])
    assert joined["config"]["variants"] == ["moc", "isolated"]
    assert joined["config"]["seeds"] == whole["config"]["seeds"][:2]
    clean = lambda runs: [{k: v for k, v in r.items() if "seconds" not in k} for r in runs]  # noqa: E731
    for mw, mj in zip(whole["stories"][:2], joined["stories"]):
        assert [r["variant"] for r in mj["runs"]] == ["moc", "isolated"]
        assert clean(mw["runs"]) == clean(mj["runs"])
    assert set(joined["summary"]) >= {"moc", "isolated"}
    with pytest.raises(ValueError, match="overlapping variant sets"):
        main(["--merge", str(tmp_path / "whole.json"), str(tmp_path / "iso.json")])


def test_a_stopped_run_leaves_its_finished_stories(tiny_model_dir, tmp_path, monkeypatch):
    """The JSON is rewritten after every story: a shard stopped midway (a GPU call's time running
    out) still holds the stories it finished, and they merge."""
    import benchmarks.quality as quality
    real, calls = quality.run_story, []

    def run_story(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process is stopped during its third story
        return real(*args, **kwargs)
    monkeypatch.setattr(quality, "run_story", run_story)
    out = tmp_path / "part.json"
    with pytest.raises(KeyboardInterrupt):
        main(["--model", str(tiny_model_dir), "--stories", "4", "--steps", "1", "--height", "32", "--width", "48",
              "--frames", "2", "--device", "cpu", "--modes", "joint", "--variants", "moc", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert [row["num_shots"] for row in saved["stories"]] == [8, 2] and saved["config"]["stories"] == 2
    assert not list(tmp_path.glob("*.tmp"))
    merged = main(["--merge", str(out), "--json", str(tmp_path / "merged.json")])
    assert len(merged["stories"]) == 2


def _whole_looks(model: StoryModel, count: int = 6) -> tuple[int, int]:
    """(appearances, drawn with the whole look: colour, size and shape in at least half the frames)
    over `count` one-shot held-out stories of 4 latent frames, rendered as the benchmark renders
    MoC joint."""
    totals = np.zeros(2, dtype=int)
    for k in range(count):
        spec = sample_story(HELDOUT_SEED_START + 500 + k, num_shots=1, frames=4, names="heldout")
        counts = score_frames(spec, render(model, to_story(spec, height=128, width=192, mode="joint")).frames)["counts"]
        totals += (counts["appearances"], counts["look_ok"])
    return tuple(int(t) for t in totals)


def test_the_shipped_model_draws_the_captions_characters(tiny_model):
    """The shipped default on six held-out one-shot stories (unseen names) draws some characters
    whole, in the caption's colour, size and shape (run 16: 4 of 13). A random model draws none on
    the same stories (its coloured noise holds every colour, so colour alone would not tell them
    apart; the whole look does)."""
    appearances, looks = _whole_looks(StoryModel.load(None, device="cpu"))
    assert appearances >= 8
    assert looks >= 2, f"whole looks in {looks} of {appearances} appearances"
    appearances, looks = _whole_looks(tiny_model)
    assert appearances >= 8 and looks == 0, f"a random model drew {looks} of {appearances} looks"
