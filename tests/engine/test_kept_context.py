"""The context K/V cache kept between renders (SamplerOptions.keep_context): another take of a shot
skips the context passes whose inputs did not change and gets the same take as reading them
afresh; a pass whose inputs changed, a stopped render, a story of another shape and a render with
no context are all handled without serving stale K/V."""

import threading

import pytest
import torch

from engine.context_cache import ContextKV
from engine.events import Progress, RenderStopped
from engine.sampler import SamplerOptions, StorySampler
from tests.engine.conftest import tiny_story

FRESH = SamplerOptions(preview=False, keep_context=False)
KEEP = SamplerOptions(preview=False)


def four_shots():
    return tiny_story("joint", seeds=(1, 2, 3, 4), frames=(2, 3, 2, 3))


def regenerate(engine, story, shot: int, seed: int, **kw):
    """A new take of `shot` (seed `seed`): (its latents, the render's context_passes, progress messages)."""
    story.shots[shot].seed = seed
    events = []
    result = engine.render(story, regenerate=shot, on_event=events.append, **kw)
    messages = [e.message for e in events if isinstance(e, Progress) and e.context is not None]
    return engine.cache.get(result.shots[shot].key).latents, result.summary["context_passes"], messages


@pytest.fixture
def pair(make_engine):
    """Two engines on the same tiny model, one keeping its context K/V and one not, each having
    rendered the same 4-shot story (the same takes, bit for bit)."""
    keep, fresh = make_engine("keep", options=KEEP), make_engine("fresh", options=FRESH)
    for engine in (keep, fresh):
        engine.render(four_shots())
    return keep, fresh


def test_another_take_of_a_shot_runs_no_context_pass_and_is_the_same_take(pair):
    keep, fresh = pair
    story_k, story_f = four_shots(), four_shots()
    first, passes, _ = regenerate(keep, story_k, 1, 7)
    assert passes == {"run": 3, "kept": 0} and keep._kept_kv is not None
    again, passes, messages = regenerate(keep, story_k, 1, 8)
    assert passes == {"run": 0, "kept": 3}
    assert messages == [f"run 1/1: shot {j} as context, kept from the last render ({i} of 3)"
                        for i, j in ((1, 1), (2, 3), (3, 4))]
    regenerate(fresh, story_f, 1, 7)
    expected, passes, _ = regenerate(fresh, story_f, 1, 8)
    assert passes == {"run": 3, "kept": 0} and fresh._kept_kv is None
    assert torch.equal(again, expected)
    assert not torch.equal(again, first)  # a new take indeed


def kept_and_fresh(pair, prepare, shot: int, seed: int, **kw):
    """`prepare(engine, story)` on both engines (each with its own story), then a take of `shot`
    (seed `seed`) on each: (the keeping engine's latents and context_passes, the other's latents)."""
    results = []
    for engine in pair:
        story = four_shots()
        prepare(engine, story)
        results.append(regenerate(engine, story, shot, seed, **kw))
    (got, passes, _), (expected, _, _) = results
    return got, passes, expected


def test_a_take_of_another_shot_keeps_only_the_passes_it_shares(pair):
    """Regenerating shot 3 both-sided read shots 1-2 causally and shot 4 without shot 3; a take of
    shot 2 then shares only shot 1's pass (the later passes must not see shot 2 now)."""
    got, passes, expected = kept_and_fresh(pair, lambda e, s: regenerate(e, s, 2, 7), 1, 9)
    assert passes == {"run": 2, "kept": 1}
    assert torch.equal(got, expected)


def test_an_earlier_only_regeneration_reuses_the_causal_passes(pair):
    # first both-sided: shots 1-2 causal, shot 4 without shot 3
    got, passes, expected = kept_and_fresh(pair, lambda e, s: regenerate(e, s, 2, 7), 2, 9, both_sides=False)
    assert passes == {"run": 0, "kept": 2}
    assert torch.equal(got, expected)


def test_a_changed_pin_reads_that_shot_and_the_later_ones_again(pair):
    """A pin on shot 4 changes what its pass attends: that pass runs again, the others are kept."""
    def prepare(engine, story):
        regenerate(engine, story, 1, 7)
        story.shots[3].pins = [0]
        story.validate()
    got, passes, expected = kept_and_fresh(pair, prepare, 1, 8)
    assert passes == {"run": 1, "kept": 2}
    assert torch.equal(got, expected)


def test_a_pass_after_a_changed_one_is_read_again_though_its_own_inputs_are_the_same(pair):
    """Shot 2, locked (its take kept), now blocks shot 1: its pass changes, and shot 4's pass,
    whose own take, caption and links did not change, attends it, so it runs again too."""
    def prepare(engine, story):
        regenerate(engine, story, 2, 7)
        story.shots[1].locked, story.shots[1].blocks = True, [0]
        story.validate()
    got, passes, expected = kept_and_fresh(pair, prepare, 2, 8)
    assert passes == {"run": 2, "kept": 1}
    assert torch.equal(got, expected)


def test_live_tokens_written_over_a_kept_pass_make_it_run_again(pair):
    """An earlier-only take of shot 3 samples over the positions that shot 3's pass (read for a
    take of shot 2) held; back on shot 3's first take, that pass runs again, the others are kept."""
    def prepare(engine, story):
        regenerate(engine, story, 1, 7)
        regenerate(engine, story, 2, 9, both_sides=False)
        story.shots[2].seed = 3  # its first take again
    got, passes, expected = kept_and_fresh(pair, prepare, 1, 8)
    assert passes == {"run": 1, "kept": 2}
    assert torch.equal(got, expected)


def test_a_stopped_regeneration_leaves_a_cache_the_next_take_can_trust(pair):
    keep, fresh = pair
    story_k, story_f = four_shots(), four_shots()
    regenerate(keep, story_k, 1, 7)
    stop = threading.Event()

    def on_event(event):  # stop in the middle of sampling: live K/V written into the held shot
        if isinstance(event, Progress) and event.step == 2:
            stop.set()
    story_k.shots[1].seed = 8
    with pytest.raises(RenderStopped):
        keep.render(story_k, regenerate=1, on_event=on_event, stop=stop)
    got, passes, _ = regenerate(keep, story_k, 1, 9)
    expected, _, _ = regenerate(fresh, story_f, 1, 9)
    assert passes == {"run": 0, "kept": 3}
    assert torch.equal(got, expected)


def test_a_render_that_reads_no_context_gives_the_kept_cache_back(pair):
    keep, _ = pair
    story = four_shots()
    regenerate(keep, story, 1, 7)
    assert keep._kept_kv is not None
    for shot in story.shots:
        shot.seed += 100  # every shot new: one joint run, no context
    keep.render(story)
    assert keep._kept_kv is None


def test_making_an_older_take_current_keeps_the_cache_for_the_next_take(pair):
    """Making a cached take current samples nothing: the kept cache survives it, and the next take
    of that shot still reads no context."""
    keep, _ = pair
    story = four_shots()
    regenerate(keep, story, 1, 7)
    first = keep.takes(story, 1)[0].key
    kv = keep._kept_kv
    keep.make_current(story, 1, first)
    assert keep._kept_kv is kv
    _, passes, _ = regenerate(keep, story, 1, 8)
    assert passes == {"run": 0, "kept": 3}


def test_a_story_of_another_shape_gets_a_new_cache(tiny_model):
    """A kept cache of another capacity is dropped, not reused: the sampler builds one that fits."""
    story = four_shots()
    other = ContextKV(2, 2, 10, 2, 12, dtype=torch.float32, device=torch.device("cpu"))
    other.held[(0, 10)] = "a pass of another story"
    sampler = StorySampler(tiny_model, story, options=KEEP, kv=other)
    kv = sampler._kv()
    assert kv is not other and kv.capacity == sampler.layout(4).num_tokens and not kv.held
    same = StorySampler(tiny_model, story, options=KEEP, kv=kv)
    kv.context_end, kv.hole = 5, (1, 3)
    assert same._kv() is kv and kv.context_end == 0 and kv.hole is None  # restarted, not rebuilt


def test_the_cache_forgets_a_pass_when_its_tokens_are_written_again():
    kv = ContextKV(2, 1, 12, 1, 4, dtype=torch.float32, device=torch.device("cpu"))
    kv.mark_context(0, 4, "a")
    kv.mark_context(4, 7, "b")
    kv.mark_context(7, 12, "c")
    assert kv.holds(0, 4, "a") and kv.holds(4, 7, "b") and not kv.holds(4, 7, "a")
    kv.open_hole(4, 7)
    kv.update(1, 5, torch.ones(1, 1, 1, 4), torch.ones(1, 1, 1, 4), 12)  # one token of "b" rewritten
    assert kv.held == {(0, 4): "a", (7, 12): "c"}
    kv.restart()
    assert kv.context_end == 0 and kv.hole is None and kv.held == {(0, 4): "a", (7, 12): "c"}
    with pytest.raises(ValueError, match="grow in order"):
        kv.mark_context(7, 12, "c")
