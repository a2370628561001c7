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
