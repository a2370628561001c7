"""Tiny models for the engine tests: 2 layers, 2 heads, odd token counts, CPU only."""

from pathlib import Path

import pytest

from engine.default_model import write_default_model
from engine.engine import StoryEngine
from engine.model import StoryModel
from engine.shot_cache import ShotCache
from engine.story import GenerationSettings, MoCSettings, Shot, Story

TINY_TRANSFORMER = dict(num_attention_heads=2, attention_head_dim=12, num_layers=2, ffn_dim=32, freq_dim=32)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return write_default_model(tmp_path_factory.mktemp("tiny_model"), seed=1, transformer=TINY_TRANSFORMER)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir) -> StoryModel:
    return StoryModel.load(tiny_model_dir, device="cpu")


@pytest.fixture
def make_engine(tiny_model, tmp_path):
    """make_engine(name) -> a StoryEngine on the shared tiny model with its own cache folder."""
    def make(name: str = "cache", **kwargs) -> StoryEngine:
        root = tmp_path / name
        return StoryEngine(tiny_model, ShotCache(root / "shots"), root, **kwargs)
    return make


def tiny_story(mode: str = "joint", seeds=(3, 5, 7), frames=(3, 2, 3), **moc) -> Story:
    """Three shots (or four, given four seeds and frames) of odd lengths at 48x80 (6x10 latent
    cells, 3x5 = 15 tokens per frame)."""
    captions = ["a red square slides left", "a blue circle grows", "the red square returns", "the circle shrinks"]
    shots = [Shot(c, f, s) for c, f, s in zip(captions, frames, seeds)]
    settings = GenerationSettings(steps=3, guidance=3.0, height=48, width=80, fps=4, mode=mode,
                                  context_noise=0.3, moc=MoCSettings(**{"top_k": 2, **moc}))
    return Story("simple shapes on grey", shots, settings).validate()
