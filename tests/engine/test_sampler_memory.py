"""A run with no context (joint mode, or the first shot) allocates no context K/V cache: at
MoC-180k with guidance the buffers would hold 62 GiB of copies of the live tokens' K/V. Checked:
no allocation in joint mode, one in shot-by-shot mode, and the forward without the buffers equals
the forward through them on the same inputs."""

import pytest
import torch

import engine.sampler as sampler_module
from engine.sampler import StorySampler

from .conftest import tiny_story


@pytest.fixture
def allocations(monkeypatch):
    made = []
    real = sampler_module.ContextKV

    def counted(*args, **kwargs):
        made.append(args)
        return real(*args, **kwargs)
    monkeypatch.setattr(sampler_module, "ContextKV", counted)
    return made


def test_joint_mode_allocates_no_context_cache(make_engine, allocations):
    result = make_engine().render(tiny_story("joint"))
    assert [s.status for s in result.shots] == ["generated"] * 3
    assert allocations == []


def test_shot_by_shot_mode_allocates_it_once(make_engine, allocations):
    make_engine().render(tiny_story("shot_by_shot"))
    assert len(allocations) == 1


@pytest.mark.parametrize("descriptor_rope", [True, False])
def test_the_forward_without_the_buffers_equals_the_forward_through_them(make_engine, descriptor_rope):
    engine = make_engine()
    story = tiny_story("joint", descriptor_rope=descriptor_rope)
    sampler = StorySampler(engine.model, story)
    shots = list(range(len(story.shots)))
    C, h, w = sampler.channels, sampler.h, sampler.w
    x = torch.randn(C, sum(s.frames for s in story.shots), h, w, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(600.0)
    direct = sampler._forward(x, t, len(shots), 0, shots, None, None)
    through = sampler._forward(x, t, len(shots), 0, shots, sampler._kv(), None)
    torch.testing.assert_close(direct, through, atol=1e-5, rtol=1e-5)
    assert direct.abs().sum() > 0


def _context_kv(engine, story, groups, exclude_after=None):
    """The context K/V after reading every shot of `story` as context, in passes `groups`
    (each a list of consecutive shots); with exclude_after=m, shot m is held and the shots after
    it are read with m excluded, as a both-sided regeneration does."""
    sampler = StorySampler(engine.model, story)
    g = torch.Generator().manual_seed(11)
    latents = {s: torch.randn(sampler.shot_latent_shape(s), generator=g) for s in range(len(story.shots))}
    for group in groups:
        exclude = ()
        if exclude_after is not None and group[0] > exclude_after:
            exclude = (exclude_after,)
            if sampler.kv is None or sampler.kv.context_end == sampler.layout(exclude_after + 1).shot_range(exclude_after)[0]:
                sampler.hold_context(exclude_after)
        sampler.encode_contexts(group, [latents[s] for s in group], [100 + s for s in group], exclude)
    return sampler.kv, sampler


@pytest.mark.parametrize("both_sided", [False, True])
def test_shots_read_in_one_context_pass_write_what_one_pass_each_writes(make_engine, both_sided):
    """Consecutive context shots share one forward where routing is causal: each shot's queries
    see its own shot and routed earlier chunks only, so its K/V (every layer) are those of its own
    pass after the earlier shots'. Also with the shot being regenerated held and excluded (the
    later shots of a both-sided regeneration)."""
    engine = make_engine()
    story = tiny_story("joint", seeds=(3, 5, 7, 9), frames=(3, 2, 3, 2))
    if both_sided:
        one, grouped = [[0], [2], [3]], [[0], [2, 3]]
        held = 1
    else:
        one, grouped = [[0], [1], [2], [3]], [[0, 1, 2], [3]]
        held = None
    kv_one, sampler = _context_kv(engine, story, one, held)
    kv_grouped, _ = _context_kv(engine, story, grouped, held)
    assert sampler.can_group() and kv_one.context_end == kv_grouped.context_end == sampler.layout(4).num_tokens
    for layer in range(len(kv_one.k)):
        for a, b in ((kv_one.k[layer], kv_grouped.k[layer]), (kv_one.v[layer], kv_grouped.v[layer])):
            torch.testing.assert_close(b, a, atol=2e-5, rtol=2e-5)
            assert a.abs().sum() > 0
    if both_sided:  # the held shot's positions were never written by a pass
        a, b = sampler.layout(2).shot_range(1)
        assert kv_one.k[0][:, a:b].abs().sum() == 0 and kv_grouped.k[0][:, a:b].abs().sum() == 0


def test_context_groups_follow_the_token_budget_and_never_group_dense_attention(make_engine):
    engine = make_engine()
    story = tiny_story("joint", seeds=(3, 5, 7, 9), frames=(3, 2, 3, 2))
    frame = StorySampler(engine.model, story).frame_tokens
    from engine.sampler import SamplerOptions
    assert StorySampler(engine.model, story).context_groups([0, 1, 2, 3]) == [[0], [1], [2], [3]]  # the default
    free = StorySampler(engine.model, story, options=SamplerOptions(context_pass_tokens=0))
    assert free.context_groups([0, 1, 2, 3]) == [[0, 1, 2, 3]]  # 0 on the CPU: no limit
    tight = StorySampler(engine.model, story, options=SamplerOptions(context_pass_tokens=5 * frame))
    assert tight.context_groups([0, 1, 2, 3]) == [[0, 1], [2, 3]]
    assert tight.context_groups([2]) == [[2]]
    one = StorySampler(engine.model, story, options=SamplerOptions(context_pass_tokens=1))
    assert one.context_groups([0, 1, 2]) == [[0], [1], [2]]
    dense = StorySampler(engine.model, tiny_story("joint", enabled=False))
    assert not dense.can_group() and dense.context_groups([0, 1]) == [[0], [1]]
    with pytest.raises(ValueError, match="causal MoC"):
        dense.encode_contexts([0, 1], [None, None], [1, 2])
    with pytest.raises(ValueError, match="consecutive"):
        tight.encode_contexts([0, 2], [None, None], [1, 2])


def test_free_gpu_bytes_counts_the_allocators_spare_memory_within_the_process_fraction(monkeypatch):
    """What a grouped context pass may use on a GPU (checked here with the CUDA queries stubbed,
    each asked for by device index, as torch requires of some of them)."""
    from engine.sampler import free_gpu_bytes
    GiB = 1 << 30
    asked = []

    def by_index(value):
        def query(index):
            assert isinstance(index, int), f"asked with {index!r}, not a device index"
            asked.append(index)
            return value
        return query
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", by_index((10 * GiB, 80 * GiB)))
    monkeypatch.setattr(torch.cuda, "memory_allocated", by_index(60 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", by_index(65 * GiB))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", by_index(1.0))
    assert free_gpu_bytes(torch.device("cuda")) == 15 * GiB  # free on the card + held unused by torch
    assert set(asked) == {1}
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", by_index(0.875))  # capped at 70 GiB
    assert free_gpu_bytes(torch.device("cuda", 0)) == 10 * GiB and asked[-1] == 0


def test_with_several_ranks_rank_0s_budget_decides_the_context_passes(make_engine):
    """Every rank must run the same passes (each forward has collectives): the grouping follows
    the budget rank 0 computes and broadcasts (SequenceParallel.on_rank0), not the local one."""
    from engine.sampler import SamplerOptions
    engine = make_engine()
    story = tiny_story("joint", seeds=(3, 5, 7, 9), frames=(3, 2, 3, 2))

    class Ranks:  # what StorySampler asks of SequenceParallel for this
        world = 2

        def heads(self, n):
            return 0, n

        def on_rank0(self, decide):
            self.local = decide()
            return 5 * frame  # rank 0's answer

    ranks = Ranks()
    sampler = StorySampler(engine.model, story, options=SamplerOptions(context_pass_tokens=0), parallel=ranks)
    frame = sampler.frame_tokens
    assert sampler.context_groups([0, 1, 2, 3]) == [[0, 1], [2, 3]]
    assert ranks.local > 10 * frame  # this rank alone (the CPU: no limit) would have read all four at once
