"""A running storyboard app for the API and browser tests: the real engine with the shipped
default model on the CPU, a temporary shot cache, a free port on 127.0.0.1, tiny stories.

One app serves the whole test session (loading the model and starting Gradio cost seconds);
each test uses its own client session and captions with a unique tag, so tests never see each
other's stories or cache entries.
"""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

import pytest

from engine.story import GenerationSettings, MoCSettings, Shot, Story

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "test-artifacts" / "screenshots"


def tiny_story(tag: str | None = None, shots: int = 3, frames: int = 2, steps: int = 3) -> Story:
    """A few frames at 64×96 with 3 steps and no guidance: a render takes seconds on 2 CPU cores."""
    tag = tag or uuid.uuid4().hex[:8]
    captions = ["a red ball bounces", "a blue cube slides right", "the ball rolls to the cube",
                "the cube spins", "both leave the lawn"]
    return Story(
        global_caption=f"a red ball and a blue cube on a green lawn [{tag}]",
        shots=[Shot(f"{captions[i % len(captions)]} ({tag})", frames) for i in range(shots)],
        settings=GenerationSettings(steps=steps, guidance=1.0, height=64, width=96, fps=8,
                                    moc=MoCSettings(top_k=2)),
    ).validate()


def long_story(tag: str | None = None) -> Story:
    """Enough steps that a Stop always lands mid-run."""
    story = tiny_story(tag, shots=2, frames=2, steps=200)
    return story


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def story_engine(tmp_path_factory):
    from engine.engine import StoryEngine

    return StoryEngine.load(model=None, device="cpu", cache_dir=tmp_path_factory.mktemp("shot-cache"))


@pytest.fixture(scope="session")
def app_url(story_engine, tmp_path_factory):
    """URL of a running app whose first example (the story the page opens with) is tiny."""
    from app.server import StoryboardApp

    examples = tmp_path_factory.mktemp("examples")
    tiny_story("browser").save(examples / "tiny.json")
    app = StoryboardApp(story_engine, examples_dir=examples, out_root=tmp_path_factory.mktemp("outputs"))
    port = free_port()
    app.launch(host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()


def pytest_terminal_summary(terminalreporter):
    if SCREENSHOTS.exists() and any(SCREENSHOTS.glob("*.png")):
        terminalreporter.write_line(f"browser screenshots: {SCREENSHOTS}")
