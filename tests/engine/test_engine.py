"""The story engine on a tiny random model: modes, determinism, regenerate, stop, cache hits."""

import threading

import av
import numpy as np
import pytest
import torch

from engine.events import Finished, Preview, Progress, RenderStopped, ShotDone, Stopped
from engine.sampler import SamplerOptions
from engine.story import Shot, StoryError
from engine.video import read_mp4
from tests.engine.conftest import tiny_story

MODES = ["joint", "shot_by_shot"]


def frames_of(engine, result):
    return [engine.cache.get(s.key).frames for s in result.shots]


@pytest.mark.parametrize("mode", MODES)
def test_shapes_files_and_report(make_engine, tmp_path, mode):
    engine = make_engine()
    story = tiny_story(mode)
    events = []
    result = engine.render(story, out_dir=tmp_path / "out", on_event=events.append)
    assert [s.status for s in result.shots] == ["generated"] * 3
    for shot, res in zip(story.shots, result.shots):
        take = engine.cache.get(res.key)
        assert tuple(take.frames.shape) == (shot.frames, 48, 80, 3) and take.frames.dtype == torch.uint8
        assert tuple(take.latents.shape) == (3, shot.frames, 6, 10)
        assert read_mp4(res.video_path).shape == (shot.frames, 48, 80, 3)
        assert 0 < res.density <= 1 and (res.density < 1 or res.index == 0)
    assert read_mp4(result.story_video).shape[0] == sum(s.frames for s in story.shots)
    for name in ("routing.json", "summary.json", "story.mp4", "shot_00.mp4", "shot_02.mp4"):
        assert (tmp_path / "out" / name).is_file()
    r = result.routing
    F = 8
    assert r["shot_frames"] == [3, 2, 3] and r["num_layers"] == 2 and r["num_heads"] == 2
    assert r["steps"] == [0, 1, 2]
    assert np.array(r["frame_selection"]["all"]).shape == (F, F)
    assert np.array(r["frame_selection"]["1"]["0"]).shape == (F, F)
    assert np.array(r["shot_recall"]).shape == (3, 3) and np.array(r["density"]).shape == (2, 2)
    sel = np.array(r["frame_selection"]["all"])
    assert np.allclose(sel[:3, :3], 1.0)  # intra-shot anchor: a shot always sees itself
    assert np.allclose(sel[:3, 3:], 0.0)  # causal: shot 0 never sees later shots
    assert 0 < r["sparsity"] < 1 and r["attn_flops_moc"] < r["attn_flops_dense"]
    assert set(r["backends"]) == {"dense"} and r["backends"]["dense"] > 0  # CPU "auto": exact masked SDPA
    # events: progress every step of every run, a preview each step, one ShotDone per shot, Finished last
    steps = [e for e in events if isinstance(e, Progress) and e.step > 0]
    assert len(steps) == (3 if mode == "joint" else 9)
    assert all(isinstance(e.frames, np.ndarray) and e.frames.dtype == np.uint8 for e in events if isinstance(e, Preview))
    assert sorted(e.index for e in events if isinstance(e, ShotDone)) == [0, 1, 2]
    assert isinstance(events[-1], Finished)


@pytest.mark.parametrize("mode", MODES)
def test_same_seed_same_frames_and_second_request_is_cached(make_engine, mode):
    a, b = make_engine("a"), make_engine("b")
    story = tiny_story(mode)
    ra, rb = a.render(story), b.render(story)
    assert [s.key for s in ra.shots] == [s.key for s in rb.shots]
    for fa, fb in zip(frames_of(a, ra), frames_of(b, rb)):
        assert torch.equal(fa, fb)
    assert a.cache.stats().misses == 3  # the first render found no take for any shot
    again = a.render(story)
    assert [s.status for s in again.shots] == ["cached"] * 3
    assert a.cache.stats().hits >= 3 and a.cache.stats().misses == 3


def test_random_seed_is_reported_and_cached(make_engine):
    engine = make_engine()
    story = tiny_story("joint", seeds=(-1, -1, -1))
    first = engine.render(story)
    assert all(0 <= s.seed < 2**32 for s in first.shots)
    again = engine.render(story)
    assert [s.status for s in again.shots] == ["cached"] * 3
    assert [s.seed for s in again.shots] == [s.seed for s in first.shots]


@pytest.mark.parametrize("mode", MODES)
def test_regenerate_keeps_other_shots_byte_identical(make_engine, tmp_path, mode):
    engine = make_engine()
    story = tiny_story(mode, seeds=(3, -1, 7))
    before = engine.render(story, out_dir=tmp_path / "before")
    old_frames = frames_of(engine, before)
    after = engine.render(story, regenerate=1, out_dir=tmp_path / "after", both_sides=False)
    assert [s.status for s in after.shots] == ["cached", "generated", "stale"]
    assert after.shots[1].seed != before.shots[1].seed or after.shots[1].key != before.shots[1].key
    new_frames = frames_of(engine, after)
    assert torch.equal(new_frames[0], old_frames[0]) and torch.equal(new_frames[2], old_frames[2])
    assert not torch.equal(new_frames[1], old_frames[1])
    for i in (0, 2):
        assert np.array_equal(read_mp4(after.shots[i].video_path), read_mp4(before.shots[i].video_path))
    # the stale shot keeps its routing rows; the report still has every shot's rows
    sel = np.array(after.routing["frame_selection"]["all"])
    assert np.allclose(sel[5:, 5:], 1.0)
    # a plain render now samples the stale shot against the new shot 1
    final = engine.render(story)
    assert [s.status for s in final.shots] == ["cached", "cached", "generated"]


def count_encodes(monkeypatch) -> list:
    """The frame counts of every MP4 the engine encodes from frames (copies and joins are not encodes)."""
    import engine.engine as engine_module
    calls, real = [], engine_module.write_mp4

    def counted(path, frames, fps):
        calls.append(int(frames.shape[0]))
        return real(path, frames, fps)
    monkeypatch.setattr(engine_module, "write_mp4", counted)
    return calls


def test_regenerate_copies_the_cached_shots_videos_and_joins_the_story(make_engine, tmp_path, monkeypatch):
    """Only the regenerated shot is encoded: the other shots' MP4s are byte copies of the ones the
    cache keeps, and story.mp4 joins the shot MP4s (its frames are theirs, exactly)."""
    engine = make_engine()
    story = tiny_story("shot_by_shot", seeds=(3, -1, 7))
    fps = story.settings.fps
    before = engine.render(story, out_dir=tmp_path / "before")
    for shot in before.shots:  # a sampled take keeps its MP4 in the cache, byte for byte the one written
        assert engine.cache.video(shot.key, fps).read_bytes() == shot.video_path.read_bytes()
    assert before.summary["story_video_from"] == "shots"
    encodes = count_encodes(monkeypatch)
    after = engine.render(story, regenerate=1, out_dir=tmp_path / "after", both_sides=False)
    assert [s.status for s in after.shots] == ["cached", "generated", "stale"]
    assert encodes == [story.shots[1].frames]  # the regenerated shot alone; not the story
    for i in (0, 2):
        assert after.shots[i].video_path.read_bytes() == engine.cache.video(after.shots[i].key, fps).read_bytes()
    story_frames = read_mp4(after.story_video)
    assert story_frames.shape == (sum(s.frames for s in story.shots), 48, 80, 3)
    assert np.array_equal(story_frames, np.concatenate([read_mp4(s.video_path) for s in after.shots]))
    assert after.summary["story_video_from"] == "shots" and "story_video_note" not in after.summary


def test_takes_cached_without_a_video_still_render(make_engine, tmp_path, monkeypatch):
    """Takes cached before the cache kept MP4s (or at another fps) are encoded once, then kept."""
    engine = make_engine()
    story = tiny_story("joint")
    engine.render(story, out_dir=tmp_path / "first")
    for video in (engine.cache.root / "entries").glob("*/*/video_*fps.mp4"):
        video.unlink()  # as a take cached by an older version has it
    encodes = count_encodes(monkeypatch)
    again = engine.render(story, out_dir=tmp_path / "again")
    assert [s.status for s in again.shots] == ["cached"] * 3 and encodes == [3, 2, 3]
    for shot in again.shots:
        assert read_mp4(shot.video_path).shape == (shot.frames, 48, 80, 3)
        assert engine.cache.video(shot.key, story.settings.fps).read_bytes() == shot.video_path.read_bytes()
    assert read_mp4(again.story_video).shape[0] == 8
    faster = story.with_settings(fps=8)  # fps is not in a take's key: the same takes, new MP4s
    encodes.clear()
    result = engine.render(faster, out_dir=tmp_path / "faster")
    assert [s.status for s in result.shots] == ["cached"] * 3 and encodes == [3, 2, 3]
    with av.open(str(result.story_video)) as container:
        assert container.streams.video[0].average_rate == 8 and container.streams.video[0].frames == 8
    encodes.clear()
    engine.render(story, out_dir=tmp_path / "third")  # both fps are kept now
    engine.render(faster, out_dir=tmp_path / "fourth")
    assert encodes == []


def test_locked_shot_is_kept(make_engine):
    engine = make_engine()
    story = tiny_story("shot_by_shot")
    engine.render(story)
    story.shots[0] = Shot("a green triangle spins", 3, 3)
    story.shots[2].locked = True
    result = engine.render(story)
    assert [s.status for s in result.shots] == ["generated", "generated", "stale"]


@pytest.mark.parametrize("mode", MODES)
def test_stop_mid_run_keeps_cache_valid(make_engine, mode):
    engine = make_engine()
    story = tiny_story(mode)
    stop = threading.Event()
    events = []

    def on_event(event):
        events.append(event)
        if isinstance(event, Progress) and event.step == 2 and 1 in event.shots:
            stop.set()  # stop in the middle of the run that samples shot 1

    with pytest.raises(RenderStopped):
        engine.render(story, on_event=on_event, stop=stop)
    assert isinstance(events[-1], Stopped)
    finished = events[-1].finished_shots
    assert finished == (() if mode == "joint" else (0,))
    stats = engine.cache.stats()
    assert stats.entries == len(finished)
    resumed = engine.render(story)
    assert [s.status for s in resumed.shots] == ["cached" if i in finished else "generated" for i in range(3)]
    fresh = make_engine("fresh").render(story)
    assert [s.key for s in resumed.shots] == [s.key for s in fresh.shots]


@pytest.mark.parametrize("descriptor_rope", [True, False], ids=["route-post-rope", "route-pre-rope"])
def test_context_cache_equals_recomputing_context(make_engine, descriptor_rope):
    """Causal MoC: a context shot never sees later tokens, so caching its K/V changes nothing
    (also when routing scores pre-RoPE keys, which the cache then stores beside K/V)."""
    story = tiny_story("shot_by_shot", descriptor_rope=descriptor_rope)
    cached = make_engine("kv")
    recompute = make_engine("recompute", options=SamplerOptions(context_cache=False))
    a, b = cached.render(story), recompute.render(story)
    for ta, tb in zip(a.shots, b.shots):
        la, lb = cached.cache.get(ta.key).latents, recompute.cache.get(tb.key).latents
        torch.testing.assert_close(la, lb, atol=1e-4, rtol=1e-4)


def test_dense_mode_reports_full_density(make_engine):
    story = tiny_story("joint", enabled=False)
    result = make_engine().render(story)
    assert all(s.density == 1.0 for s in result.shots)
    assert result.routing["sparsity"] == 0.0


def test_model_specific_errors(make_engine):
    engine = make_engine()
    story = tiny_story()
    with pytest.raises(StoryError, match="regenerate"):
        engine.render(story, regenerate=3)
    story.settings.moc.backend = "triton"
    with pytest.raises(StoryError) as err:
        engine.render(story)
    assert err.value.field == "settings.moc.backend"
    story = tiny_story(frames=(128,) * 9 + (3,))
    story = tiny_story()
    story.shots = [Shot(f"s{i}", 128, i) for i in range(9)]
    with pytest.raises(StoryError) as err:
        engine.render(story)
    assert err.value.field == "shots"


def test_available_backends(make_engine):
    names = make_engine().available_backends()
    assert names[:2] == ["auto", "reference"]


def test_regenerate_after_caption_edit_keeps_later_takes_as_stale(make_engine):
    engine = make_engine()
    story = tiny_story("joint")
    before = engine.render(story)
    story.shots[1] = Shot("a yellow star falls", 2, 5)
    after = engine.render(story, regenerate=1, both_sides=False)
    assert [s.status for s in after.shots] == ["cached", "generated", "stale"]
    assert after.shots[2].key == before.shots[2].key
    assert after.shots[0].key == before.shots[0].key


def test_regenerate_with_a_fixed_seed_twice_is_a_cache_hit(make_engine):
    engine = make_engine()
    story = tiny_story("joint")
    engine.render(story)
    first = engine.render(story, regenerate=1, both_sides=False)
    second = engine.render(story, regenerate=1, both_sides=False)
    assert first.shots[1].status == "generated" and second.shots[1].status == "cached"
    assert second.shots[1].key == first.shots[1].key and second.shots[2].status == "stale"
    both = [engine.render(story, regenerate=1, both_sides=True) for _ in range(2)]
    assert [b.shots[1].status for b in both] == ["generated", "cached"] and both[0].shots[1].key == both[1].shots[1].key
    assert [b.shots[2].status for b in both] == ["cached", "cached"]


@pytest.mark.parametrize("both_sides", [False, True])
def test_a_regeneration_shows_each_context_pass_before_its_steps(make_engine, both_sides):
    """The context passes before a regeneration's sampling take seconds on a GPU (a both-sided one
    reads every other shot): each is announced, in the order it runs, before the first step."""
    engine = make_engine()
    story = tiny_story("joint", seeds=(1, 2, 3))
    engine.render(story)
    story.shots[1].seed = 7
    events = []
    engine.render(story, regenerate=1, both_sides=both_sides, on_event=events.append)
    progress = [e for e in events if isinstance(e, Progress)]
    reading = [e.message for e in progress if e.context is not None]
    expected = [0, 2] if both_sides else [0]  # the shots before and, both-sided, after shot 1
    assert reading == [f"run 1/1: reading shot {j + 1} as context ({i + 1} of {len(expected)})"
                       for i, j in enumerate(expected)]
    first_step = next(i for i, e in enumerate(progress) if e.step > 0)
    assert [e.context for e in progress[:first_step] if e.context is not None] == expected
    assert all(e.context is None for e in progress[first_step:])
    assert all(e.shots == (1,) and e.step == 0 for e in progress[:first_step])  # the shot being made


def test_a_regeneration_reads_consecutive_cached_shots_in_one_pass_and_gets_the_same_take(make_engine):
    """Regenerating shot 3 of 4 with both sides: shots 1-2 are read in one context pass (causal
    routing, no memory limit on the CPU) and shot 4 in a second; the new take equals the one made
    with one pass per shot (SamplerOptions(context_pass_tokens=1)) up to float rounding."""
    takes = {}
    for tokens in (0, 1):
        engine = make_engine(f"tokens{tokens}", options=SamplerOptions(preview=False, context_pass_tokens=tokens))
        story = tiny_story("joint", seeds=(1, 2, 3, 4), frames=(2, 3, 2, 2))
        engine.render(story)
        story.shots[2].seed = 9
        events = []
        result = engine.render(story, regenerate=2, on_event=events.append)
        reading = [e for e in events if isinstance(e, Progress) and e.context is not None]
        takes[tokens] = engine.cache.get(result.shots[2].key).latents
        if tokens == 0:
            assert [e.context_shots for e in reading] == [(0, 1), (3,)]
            assert [e.message for e in reading] == ["run 1/1: reading shots 1-2 as context (1 of 2)",
                                                    "run 1/1: reading shot 4 as context (2 of 2)"]
        else:
            assert [e.context_shots for e in reading] == [(0,), (1,), (3,)]
    torch.testing.assert_close(takes[0], takes[1], atol=1e-4, rtol=1e-4)
    assert takes[0].abs().sum() > 0


@pytest.mark.parametrize("mode", MODES)
def test_memory_pins_and_blocks_in_a_render(make_engine, mode):
    """Shot 2 pins shot 0 and blocks shot 1: the report shows shot 2's queries on every frame of
    shot 0 and on none of shot 1, lists the links apart, and the pinned shot has its own key."""
    engine = make_engine()
    plain = tiny_story(mode, top_k=1)
    pinned = tiny_story(mode, top_k=1)
    pinned.shots[2].pins, pinned.shots[2].blocks = [0], [1]
    a, b = engine.render(plain), engine.render(pinned.validate())
    assert [s.key for s in a.shots[:2]] == [s.key for s in b.shots[:2]] and a.shots[2].key != b.shots[2].key
    assert [s.status for s in b.shots] == ["cached", "cached", "generated"]
    r = b.routing
    assert r["pins"] == [[2, 0]] and r["blocks"] == [[2, 1]] and a.routing["pins"] == []
    sel = np.array(r["frame_selection"]["all"])  # frames: shot 0 = 0..2, shot 1 = 3..4, shot 2 = 5..7
    assert np.allclose(sel[5:, :3], 1.0) and np.allclose(sel[5:, 3:5], 0.0)
    assert not np.allclose(np.array(a.routing["frame_selection"]["all"])[5:, :3], 1.0)


@pytest.mark.parametrize("mode", MODES)
def test_regenerate_with_both_sides_as_context(make_engine, mode):
    """Regenerating the middle shot sees the shot after it: that shot keeps its take byte for
    byte and is not stale, the middle shot's queries route into its frames (one-sided: never),
    and a plain generate afterwards serves every shot from the cache."""
    engine = make_engine()
    story = tiny_story(mode)
    first = engine.render(story)
    last_frames = engine.cache.get(first.shots[2].key).frames.clone()
    story.shots[1].caption = "a blue circle shrinks instead"
    both = engine.render(story, regenerate=1)
    assert [s.status for s in both.shots] == ["cached", "generated", "cached"]
    assert both.summary["both_sides"] is True and both.shots[2].key == first.shots[2].key
    assert torch.equal(engine.cache.get(both.shots[2].key).frames, last_frames)
    sel = np.array(both.routing["frame_selection"]["all"])  # frames: 0-2 shot 1, 3-4 shot 2, 5-7 shot 3
    assert sel[3:5, 5:].sum() > 0
    again = engine.render(story)
    assert [s.status for s in again.shots] == ["cached"] * 3
    one = engine.render(story, regenerate=1, both_sides=False)
    assert [s.status for s in one.shots] == ["cached", "generated", "stale"]
    assert one.shots[1].key != both.shots[1].key and one.summary["both_sides_note"] == "not asked for"
    assert np.allclose(np.array(one.routing["frame_selection"]["all"])[3:5, 5:], 0.0)


def test_both_sides_with_the_later_chunks_in_a_top_k_of_their_own(make_engine):
    """SamplerOptions.open_top_k (2 by default): a both-sided regeneration keeps its causal top-k and
    routes that many more into the later shot; only its take's key depends on the option (an
    ordinary render's keys do not), and the later shot stays as it was."""
    from engine.sampler import SamplerOptions
    shared, split = make_engine("shared", options=SamplerOptions(open_top_k=0)), make_engine("split")
    assert split.options.open_top_k == 2
    story = tiny_story("joint", top_k=1)
    assert shared._common(story) == split._common(story)
    first = [engine.render(story) for engine in (shared, split)]
    assert [s.key for s in first[0].shots] == [s.key for s in first[1].shots]
    a = shared.render(story, regenerate=1, both_sides=True)
    b = split.render(story, regenerate=1, both_sides=True)
    assert [s.status for s in b.shots] == ["cached", "generated", "cached"] and a.shots[1].key != b.shots[1].key
    assert b.shots[2].key == first[1].shots[2].key
    sel_a, sel_b = (np.array(r.routing["frame_selection"]["all"]) for r in (a, b))  # shot 2 = frames 3-4
    assert sel_b[3:5, 5:].sum() > 0  # it routes into the later shot
    assert sel_b[3:5, :3].sum() >= sel_a[3:5, :3].sum() - 1e-6  # and keeps its earlier recall


def test_both_sides_says_why_not(make_engine):
    engine = make_engine()
    story = tiny_story("shot_by_shot")
    with pytest.raises(StoryError, match="shot 2 has no take yet"):
        engine.render(story, regenerate=0, both_sides=True)
    engine.render(story)
    with pytest.raises(StoryError, match="it is the last shot"):
        engine.render(story, regenerate=2, both_sides=True)
    result = engine.render(story, regenerate=2)  # None: one-sided where both sides cannot be
    assert result.summary["both_sides"] is False and result.summary["both_sides_note"] == "it is the last shot"
    dense = tiny_story("shot_by_shot")
    dense.settings.moc.enabled = False
    engine.render(dense)
    with pytest.raises(StoryError, match="settings.moc.enabled"):
        engine.render(dense, regenerate=0, both_sides=True)


def test_compiled_blocks_render_the_frames_eager_renders(tiny_model_dir, tmp_path):
    """launch.py --compile (StoryTransformer.compile_blocks at sampling, attention left eager): the
    same story and seeds give the same cache keys and, within a grey level, the same frames."""
    import launch
    args = launch.parse_args(["--model", str(tiny_model_dir), "--cache-dir", str(tmp_path / "b"), "--compile"])
    compiled = launch.load_engine(args, None, "cpu", preview=False)
    assert all(block._compiled_call_impl is not None for block in compiled.model.transformer.model.blocks)
    eager = launch.load_engine(launch.parse_args(["--model", str(tiny_model_dir), "--cache-dir", str(tmp_path / "a")]),
                               None, "cpu", preview=False)
    assert all(block._compiled_call_impl is None for block in eager.model.transformer.model.blocks)
    story = tiny_story("joint")
    ra, rb = eager.render(story), compiled.render(story)
    assert [s.key for s in ra.shots] == [s.key for s in rb.shots]
    for fa, fb in zip(frames_of(eager, ra), frames_of(compiled, rb)):
        assert (fa.int() - fb.int()).abs().max() <= 2
