"""The storyboard app: a Gradio Blocks UI and named API endpoints over one StoryEngine.

For: `serve` (launch.py calls it) and `StoryboardApp`, which holds the engine, the render worker
and the output folder, and is assembled from four parts, each in its own short file:
  app/layout.py   the components (Storyboard, Routing and Settings tabs)
  app/events.py   the form <-> story mapping and one render streamed to the UI
  app/api.py      the gradio_client endpoints (docs/API.md)
  app/recall.py   what each shot remembered, as pictures (Routing tab), and the /recall endpoint
  app/takes.py    a shot's takes: browse, compare, make current (and their endpoints)
with the pure view helpers in app/views.py, story edits in app/state.py, the render queue in
app/worker.py and the plots in app/plots.py.
Not for: rendering (engine/), story rules (engine/story.py) or argument parsing (launch.py).
Across several processes (torchrun) launch.py serves from rank 0: it passes that rank's engine and
an engine.ranks.Leader, which the render worker renders through so every rank renders each job.

Reading order: `serve` -> `StoryboardApp.build` (layout.py) -> `StoryboardApp._render`
(events.py: one render, from click to last event). Each browser tab keeps its own `Board` in a
`gr.State`; the engine, the worker and the output folder are shared and live on the
`StoryboardApp` object, never in module globals.
"""

from __future__ import annotations

import html
import shutil
import tempfile
from dataclasses import asdict, is_dataclass
from pathlib import Path

import gradio as gr

from engine.story import MAX_STORY_BYTES, Story, StoryError

from .api import Api
from .events import Events
from .layout import Layout
from .recall import RecallView
from .state import MAX_SHOTS
from .takes import TAKES_CSS, Takes
from .views import (CSS, EXAMPLES_DIR, PREVIEW_FRAMES, PREVIEW_MIN_HEIGHT, THEME, cache_saved, earlier_shots,
                    fallback_story, is_default_model, log, model_note, preview_strip, readable_story_error,
                    routing_summary, shot_dict, shot_header, status_html)
from .worker import Worker


def serve(model=None, host: str = "127.0.0.1", port: int = 7860, cache_dir=None, device: str = "auto",
          share: bool = False, auth: tuple[str, str] | None = None, engine=None, renderer=None):
    """Load the engine, build the app and serve it until interrupted (called by launch.py).
    auth: (user, password) every browser and API client must give (None: no login).
    engine: one loaded already (then model, cache_dir and device are not used); renderer: what the
    render worker renders through (see StoryboardApp; under torchrun, rank 0's engine.ranks.Leader)."""
    if engine is None:
        from engine.engine import StoryEngine

        kwargs = {"model": model, "device": device}
        if cache_dir is not None:
            kwargs["cache_dir"] = cache_dir
        engine = StoryEngine.load(**kwargs)
    app = StoryboardApp(engine, renderer=renderer)
    try:
        app.launch(host=host, port=port, share=share, auth=auth)
    finally:
        app.close()


class StoryboardApp(Layout, Events, Api, RecallView, Takes):
    """The engine, the render worker and the Blocks that drive them."""

    def __init__(self, engine, examples_dir: str | Path = EXAMPLES_DIR, out_root: str | Path | None = None,
                 renderer=None):
        """renderer: what the render worker calls `render` / `make_current` on (default: the engine;
        across several processes engine.ranks.Leader, which renders every job on all of them)."""
        self.engine = engine
        self.examples_dir = Path(examples_dir)
        self._own_out_root = out_root is None  # a temporary folder, removed by close()
        self.out_root = Path(out_root) if out_root else Path(tempfile.mkdtemp(prefix="moc-storyboard-"))
        self.out_root.mkdir(parents=True, exist_ok=True)
        self.worker = Worker(renderer if renderer is not None else engine, self.out_root / "renders")
        self.examples = self._load_examples()
        self.demo: gr.Blocks | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    def launch(self, host: str = "127.0.0.1", port: int = 7860, share: bool = False, **kwargs):
        """Build (once) and launch; extra kwargs go to `Blocks.launch` (tests: prevent_thread_lock)."""
        demo = self.build() if self.demo is None else self.demo
        demo.queue(default_concurrency_limit=8)
        allowed = [str(self.out_root)]
        cache_root = getattr(getattr(self.engine, "cache", None), "root", None)
        if cache_root:
            allowed.append(str(cache_root))
        return demo.launch(server_name=host, server_port=port, share=share, theme=THEME, css=CSS + TAKES_CSS,
                           allowed_paths=allowed, footer_links=["api", "settings"], show_error=True, ssr_mode=False,
                           max_file_size=MAX_STORY_BYTES, **kwargs)

    def close(self) -> None:
        self.worker.close()
        if self.demo is not None:
            self.demo.close()
        if self._own_out_root:
            shutil.rmtree(self.out_root, ignore_errors=True)

    # -- examples ---------------------------------------------------------------------------------

    def _load_examples(self) -> dict[str, Story]:
        examples = {}
        for path in sorted(self.examples_dir.glob("*.json")):
            try:
                examples[path.stem.replace("_", " ")] = Story.load(path)
            except StoryError as error:
                log.warning("skipping example %s: %s", path.name, error)
        return examples

    def initial_story(self) -> Story:
        """A fresh copy of the first example that fits the editor (sessions never share a Story)."""
        for story in self.examples.values():
            if len(story.shots) <= MAX_SHOTS:
                return Story.from_dict(story.to_dict())
        return fallback_story()

    def _available_backends(self) -> list[str]:
        available = getattr(self.engine, "available_backends", None)
        return list(available()) if callable(available) else []

    def _engine_html(self) -> str:
        rows = [("Model", getattr(self.engine, "model_name", "?")), ("Device", self._device()),
                ("Backends", ", ".join(self._available_backends()) or "?")]
        parallel = getattr(self.engine, "parallel", None)
        if parallel is not None:
            rows.append(("Sequence parallel", f"{parallel.world} processes (rank 0 serves the app)"))
        stats = self._cache_stats()
        if stats:
            rows.append(("Shot cache", f"{stats.get('entries', 0)} takes, {stats.get('bytes', 0) / 2**20:.1f} MiB "
                                       f"of {stats.get('max_bytes', 0) / 2**30:.1f} GiB · "
                                       f"{stats.get('hits', 0)} hits, {stats.get('misses', 0)} misses"))
        body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
        return f'<table class="engine-info">{body}</table>'

    def _device(self) -> str:
        device = getattr(self.engine, "device", None) or getattr(getattr(self.engine, "model", None), "device", "")
        return str(device)

    def _cache_stats(self) -> dict:
        cache = getattr(self.engine, "cache", None)
        if cache is None or not callable(getattr(cache, "stats", None)):
            return {}
        stats = cache.stats()
        return asdict(stats) if is_dataclass(stats) else dict(stats)


__all__ = ["serve", "StoryboardApp", "CSS", "EXAMPLES_DIR", "PREVIEW_FRAMES", "PREVIEW_MIN_HEIGHT", "THEME", "cache_saved", "earlier_shots", "fallback_story", "is_default_model", "log", "model_note", "preview_strip", "readable_story_error", "routing_summary", "shot_dict", "shot_header", "status_html"]  # the views, for callers of app.server
