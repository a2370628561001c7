"""The storyboard app: a Gradio Blocks UI and named API endpoints over one StoryEngine.

For: laying out the editor (story, shot cards, settings, a note on what the default model
draws), turning clicks into `app.state` edits, sending renders to the `app.worker.Worker` and
streaming its events back as UI updates, drawing the routing report with `app.plots`, and the
`gradio_client` endpoints (`/generate`, `/regenerate`, `/stop`, `/save_story`, `/load_story`,
`/example_story`, `/info`).
Not for: rendering (engine/), story rules (engine/story.py) or argument parsing (launch.py).

Reading order: `serve` -> `StoryboardApp.build` (the layout) -> `StoryboardApp._render` (one
render, from click to last event). Each browser tab keeps its own `Board` in a `gr.State`; the
engine, the worker and the output folder are shared and live on the `StoryboardApp` object,
never in module globals.
"""

from __future__ import annotations

import html
import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, is_dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import gradio as gr
import numpy as np

from engine.events import Finished, Preview, Progress, ShotDone, Stopped
from engine.model import DEFAULT_MODEL_DIR, model_identity
from engine.shapestory.world import (ACTION_WORDS, ACTIONS, COLOURS, FRAMING_WORDS, MAX_CHARACTERS, PATTERNS,
                                     SHAPES, SIZES, WORLDS, Character)
from engine.story import ANCHORS, CHUNKINGS, MAX_STORY_BYTES, Shot, Story, StoryError

from . import plots
from .state import (MAX_SHOTS, STATUSES, Board, add_shot, apply_result, apply_shot, duplicate_shot,
                    load_story, mark_queued, mark_rendering, move_shot, new_board, remove_shot, set_story, settle)
from .worker import TERMINAL, BusyError, Failed, Queued, Started, Worker

log = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
PREVIEW_FRAMES = 6  # frames shown side by side in the live preview
PREVIEW_MIN_HEIGHT = 112  # small previews are upscaled (nearest) to at least this many pixels



def fallback_story() -> Story:
    """The story the editor opens with when examples/ has none: ShapeStory, which the default
    model draws (a look stated once, then the name alone)."""
    return Story(global_caption="A story on a clear sky.",
                 shots=[Shot("Kip, a small red triangle, bounces.", 8),
                        Shot("Wide shot: Momo, a big blue circle, slides to the right.", 8),
                        Shot("Kip moves left while Momo grows.", 8)])


def _listing(words, last: str = "or") -> str:
    """['a', 'b', 'c'] -> 'a, b or c'."""
    words = list(words)
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} {last} {words[-1]}"


def _action_listing() -> str:
    """The caption verbs of ACTIONS, a shared verb said once: 'moves left/right/up/down, grows, …'."""
    phrases = [ACTION_WORDS[a][0] for a in ACTIONS]  # "moves left", ..., "grows", ..., "stays still"
    verbs = [phrase.split(" ", 1)[0] for phrase in phrases]
    groups: dict[str, list[str]] = {}  # head -> the tails that follow it, in ACTIONS order
    for phrase, verb in zip(phrases, verbs):
        if verbs.count(verb) > 1:
            groups.setdefault(verb, []).append(phrase.split(" ", 1)[1])
        else:
            groups[phrase] = []
    return _listing(f"{head} {'/'.join(tails)}" if tails else head for head, tails in groups.items())


def model_note(trained: bool = True) -> str:
    """What the default model understands, in Markdown, built from the ShapeStory vocabulary
    (engine/shapestory/world.py) so that the note grows with it."""
    kip = Character("Kip", "red", "triangle", "small")
    introduced = f"{kip.name}, a {kip.look()}, {ACTION_WORDS['bounces'][0]}."  # "Kip, a small red triangle, ..."
    named = f"{kip.name} {ACTION_WORDS['up'][1]}."  # "Kip rises."
    wide, close = FRAMING_WORDS["wide"][0], FRAMING_WORDS["close"][0]
    patterns = [p for p in PATTERNS if p != "none"]
    note = (
        f"The default model draws **ShapeStory**: 1–{MAX_CHARACTERS} named characters "
        f"({_listing(SHAPES)}; {_listing(SIZES)}; {_listing(COLOURS)}) on {_listing(WORLDS)} "
        f"(optionally with {_listing(patterns)}). In each shot a character {_action_listing()}, "
        f"wide or close-up (\"{wide} …\", \"{close} …\"). Introduce a character with its look once "
        f"(\"{introduced}\"), then just use its name (\"{named}\"): its look comes from memory of earlier shots. "
        "Any Wan2.1 diffusers checkpoint loads with `python launch.py --model PATH`.")
    if not trained:
        note += " *This copy of the default model is untrained: it draws coloured noise.*"
    return note


def is_default_model(engine) -> bool:
    """Whether `engine` runs the shipped default model (same content as assets/default_model)."""
    identity = getattr(getattr(engine, "model", None), "identity", None)
    return identity is not None and DEFAULT_MODEL_DIR.is_dir() and identity == model_identity(DEFAULT_MODEL_DIR)


def serve(model=None, host: str = "127.0.0.1", port: int = 7860, cache_dir=None, device: str = "auto",
          share: bool = False, auth: tuple[str, str] | None = None):
    """Load the engine, build the app and serve it until interrupted (called by launch.py).
    auth: (user, password) every browser and API client must give (None: no login)."""
    from engine.engine import StoryEngine

    kwargs = {"model": model, "device": device}
    if cache_dir is not None:
        kwargs["cache_dir"] = cache_dir
    engine = StoryEngine.load(**kwargs)
    app = StoryboardApp(engine)
    try:
        app.launch(host=host, port=port, share=share, auth=auth)
    finally:
        app.close()


class StoryboardApp:
    """The engine, the render worker and the Blocks that drive them."""

    def __init__(self, engine, examples_dir: str | Path = EXAMPLES_DIR, out_root: str | Path | None = None):
        self.engine = engine
        self.examples_dir = Path(examples_dir)
        self._own_out_root = out_root is None  # a temporary folder, removed by close()
        self.out_root = Path(out_root) if out_root else Path(tempfile.mkdtemp(prefix="moc-storyboard-"))
        self.out_root.mkdir(parents=True, exist_ok=True)
        self.worker = Worker(engine, self.out_root / "renders")
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
        return demo.launch(server_name=host, server_port=port, share=share, theme=THEME, css=CSS,
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

    # -- layout -----------------------------------------------------------------------------------

    def build(self) -> gr.Blocks:
        story = self.initial_story()
        board = new_board(story)
        with gr.Blocks(title="MoC Storyboard") as demo:
            self.board = gr.State(board)
            gr.HTML(self._header_html(), elem_id="app-header")
            with gr.Tabs():
                with gr.Tab("Storyboard", id="storyboard"):
                    self._build_storyboard(story)
                with gr.Tab("Routing", id="routing"):
                    self._build_routing()
                with gr.Tab("Settings", id="settings"):
                    self._build_settings(story)
            self._build_api()
            self._wire()
        self.demo = demo
        return demo

    def _header_html(self) -> str:
        name = html.escape(str(getattr(self.engine, "model_name", "model")))
        device = html.escape(self._device())
        return (
            '<div class="brand"><div class="brand-mark">MoC</div><div>'
            '<div class="brand-title">Storyboard</div>'
            '<div class="brand-sub">Compose multi-shot videos; every shot remembers the ones before it.</div>'
            f'</div><div class="brand-model"><span>{name}</span><span>{device}</span></div></div>'
        )

    def _build_storyboard(self, story: Story) -> None:
        with gr.Row(equal_height=False):
            with gr.Column(scale=9, min_width=480):
                with gr.Group(elem_classes="story-head"):
                    self.global_caption = gr.Textbox(
                        story.global_caption, label="Global caption",
                        info="What holds in every shot: characters, place, style.", lines=2,
                        elem_id="global-caption")
                with gr.Row(elem_classes="story-tools"):
                    first = next((name for name, ex in self.examples.items() if ex.to_dict() == story.to_dict()), None)
                    self.example = gr.Dropdown(list(self.examples), value=first, label="Start from an example",
                                               scale=3, min_width=200, elem_id="example")
                    self.open_btn = gr.UploadButton("Open story…", file_types=[".json"], size="md",
                                                    scale=1, min_width=120, elem_id="open-story")
                    self.save_btn = gr.Button("Save story", size="md", scale=1, min_width=120,
                                              elem_id="save-story")
                self.saved_file = gr.File(label="Story JSON", visible=False, elem_id="saved-story",
                                          interactive=False)
                if is_default_model(self.engine):
                    with gr.Accordion("What the default model knows", open=True, elem_id="model-note"):
                        gr.Markdown(model_note(trained=bool(getattr(self.engine.model, "trained", True))),
                                    elem_classes="hint")
                with gr.Row(elem_classes="shot-grid", equal_height=False):
                    self.slots = [self._build_slot(i, story) for i in range(MAX_SHOTS)]
                self.add_btn = gr.Button("+ Add shot", elem_id="add-shot", elem_classes="add-shot")
                gr.Markdown("Frames are latent frames. Seed −1 draws a random seed; the seed used is shown on "
                            "the card, and locking a shot keeps that take when you generate again.",
                            elem_classes="hint")
            with gr.Column(scale=4, min_width=340, elem_classes="render-panel"):
                with gr.Row():
                    self.generate_btn = gr.Button("Generate story", variant="primary", size="lg",
                                                  scale=3, elem_id="generate")
                    self.stop_btn = gr.Button("Stop", variant="stop", size="lg", scale=1, elem_id="stop")
                self.status = gr.HTML(status_html("idle", "Ready", "Edit the story, then generate."),
                                      elem_id="status")
                self.preview = gr.Image(label="Current estimate", type="numpy", interactive=False,
                                        height=170, elem_id="preview", buttons=[])
                self.story_video = gr.Video(label="Whole story", interactive=False, loop=True,
                                            buttons=["download"], elem_id="story-video", height=300)
                self.render_stats = gr.HTML(plots.stat_cards(None, None), elem_id="render-stats")

    def _build_slot(self, i: int, story: Story) -> dict[str, Any]:
        shot = story.shots[i] if i < len(story.shots) else None
        slot: dict[str, Any] = {}
        with gr.Column(visible=shot is not None, elem_classes="shot-card", elem_id=f"shot-{i}",
                       min_width=260) as slot["card"]:
            slot["header"] = gr.HTML(shot_header(i, None, shot), elem_classes="shot-header")
            slot["video"] = gr.Video(label=f"Shot {i + 1}", show_label=False, interactive=False, loop=True,
                                     height=150, elem_id=f"shot-video-{i}", buttons=["download"])
            slot["caption"] = gr.Textbox(shot.caption if shot else "", show_label=False, lines=3, max_lines=6,
                                         placeholder="What happens in this shot?",
                                         elem_id=f"shot-caption-{i}", interactive=not (shot and shot.locked))
            with gr.Row(elem_classes="shot-fields"):
                slot["frames"] = gr.Number(shot.frames if shot else 3, label="Frames", precision=0, scale=2,
                                           minimum=1, maximum=128, min_width=0, elem_id=f"shot-frames-{i}")
                slot["seed"] = gr.Number(shot.seed if shot else -1, label="Seed", precision=0, scale=3,
                                         minimum=-1, min_width=0, elem_id=f"shot-seed-{i}")
            with gr.Row(elem_classes="shot-actions"):
                slot["up"] = gr.Button("◀", size="sm", min_width=0, scale=1, elem_id=f"shot-up-{i}")
                slot["down"] = gr.Button("▶", size="sm", min_width=0, scale=1, elem_id=f"shot-down-{i}")
                slot["duplicate"] = gr.Button("Copy", size="sm", min_width=0, scale=2, elem_id=f"shot-dup-{i}")
                slot["remove"] = gr.Button("Remove", size="sm", min_width=0, scale=2, elem_id=f"shot-remove-{i}")
            with gr.Row(elem_classes="shot-actions"):
                slot["locked"] = gr.Checkbox(bool(shot and shot.locked), label="Lock", min_width=0,
                                             elem_id=f"shot-lock-{i}", container=False, scale=1)
                slot["regenerate"] = gr.Button("Regenerate", size="sm", variant="primary", min_width=0, scale=2,
                                               elem_id=f"shot-regen-{i}", elem_classes="regen")
            with gr.Accordion("Memory", open=False, visible=i > 0, elem_id=f"shot-memory-{i}",
                              elem_classes="shot-memory"):
                choices = earlier_shots(story, i)
                slot["pins"] = gr.Dropdown(choices, value=list(shot.pins) if shot else [], multiselect=True,
                                           label="Always sees (pinned)", elem_id=f"shot-pins-{i}",
                                           info="earlier shots this shot must recall, whatever routing picks")
                slot["blocks"] = gr.Dropdown(choices, value=list(shot.blocks) if shot else [], multiselect=True,
                                             label="Never recalls (blocked)", elem_id=f"shot-blocks-{i}")
        return slot

    def _build_routing(self) -> None:
        gr.Markdown("How Mixture-of-Contexts attention routed the last render: each query frame picks "
                    "the key frames (chunks) it attends to. Purple lines are shot boundaries.",
                    elem_classes="muted")
        self.routing_stats = gr.HTML(plots.stat_cards(None, None), elem_id="routing-stats")
        with gr.Row():
            self.layer = gr.Dropdown(plots.layer_choices(None), value=plots.ALL, label="Layer", min_width=120,
                                     elem_id="layer")
            self.step = gr.Dropdown(plots.step_choices(None), value=plots.ALL, label="Denoising step",
                                    min_width=120, elem_id="step")
        with gr.Row():
            with gr.Column(scale=3):
                self.frame_plot = gr.Plot(plots.frame_heatmap(None), label="Frame selection", show_label=False,
                                          elem_id="frame-heatmap")
                self.flops_plot = gr.Plot(plots.flops_figure(None), label="FLOPs", show_label=False, elem_id="flops")
            with gr.Column(scale=2):
                self.recall_plot = gr.Plot(plots.shot_recall(None), label="Shot recall", show_label=False, elem_id="shot-recall")
                self.density_plot = gr.Plot(plots.density_heatmap(None), label="Density", show_label=False, elem_id="density")

    def _build_settings(self, story: Story) -> None:
        s, moc = story.settings, story.settings.moc
        backends = ["auto"] + [b for b in self._available_backends() if b != "auto"]
        with gr.Row():
            with gr.Column():
                gr.Markdown("### Sampling")
                self.settings = {
                    "mode": gr.Radio([("Joint: all shots together", "joint"),
                                      ("Shot by shot: reuse earlier shots' K/V", "shot_by_shot")],
                                     value=s.mode, label="Mode", elem_id="mode"),
                    "steps": gr.Slider(1, 200, value=s.steps, step=1, label="Steps", elem_id="steps"),
                    "guidance": gr.Slider(1.0, 15.0, value=s.guidance, step=0.5, label="Guidance",
                                          info="1 = no classifier-free guidance", elem_id="guidance"),
                    "height": gr.Number(s.height, label="Height (px)", precision=0, step=16, elem_id="height"),
                    "width": gr.Number(s.width, label="Width (px)", precision=0, step=16, elem_id="width"),
                    "fps": gr.Slider(1, 60, value=s.fps, step=1, label="Frames per second", elem_id="fps"),
                    "context_noise": gr.Slider(0.0, 1.0, value=s.context_noise, step=0.05,
                                               label="Context noise t_c",
                                               info="Noise level fixed context shots are re-noised to",
                                               elem_id="context-noise"),
                    "negative_caption": gr.Textbox(s.negative_caption, label="Negative caption",
                                                   elem_id="negative-caption"),
                }
            with gr.Column():
                gr.Markdown("### Mixture of Contexts")
                self.moc_settings = {
                    "enabled": gr.Checkbox(moc.enabled, label="Sparse attention (MoC); off = dense",
                                           elem_id="moc-enabled"),
                    "top_k": gr.Slider(1, 32, value=moc.top_k, step=1, label="k: routed chunks per query",
                                       elem_id="top-k"),
                    "chunking": gr.Radio(list(CHUNKINGS), value=moc.chunking, label="Chunking", elem_id="chunking"),
                    "chunk_size": gr.Number(moc.chunk_size, label="Chunk size (tokens; 0 with frame chunks)",
                                            precision=0, minimum=0, elem_id="chunk-size"),
                    "anchor": gr.Radio(list(ANCHORS), value=moc.anchor, label="Forced link inside a shot",
                                       elem_id="anchor"),
                    "window": gr.Slider(0, 16, value=moc.window, step=1, label="Window (anchor = window)",
                                        elem_id="window"),
                    "causal": gr.Checkbox(moc.causal, label="Causal: only earlier chunks are routed",
                                          elem_id="causal"),
                    "text_anchor": gr.Checkbox(moc.text_anchor,
                                               label="Forced text links: global caption + own shot caption",
                                               elem_id="text-anchor"),
                    "backend": gr.Dropdown(backends, value=moc.backend if moc.backend in backends else "auto",
                                           label="Attention backend", elem_id="backend"),
                }
                self.engine_info = gr.HTML(self._engine_html(), elem_id="engine-info")

    def _build_api(self) -> None:
        """Components for the named endpoints only; never shown."""
        with gr.Column(visible=False):
            self.api_trigger = gr.Button("api")
            self.api_story = gr.JSON(label="story")
            self.api_shot = gr.Number(label="shot")  # no rounding: 0.5 is an error, not shot 0
            self.api_file_in = gr.File(label="story_file", file_types=[".json"])
            self.api_video = gr.File(label="story_video")
            self.api_shot_videos = gr.File(label="shot_videos", file_count="multiple")
            self.api_result = gr.JSON(label="result")
            self.api_file_out = gr.File(label="story_file")
            self.api_story_out = gr.JSON(label="story")
            self.api_message = gr.Textbox(label="message")
            self.api_info = gr.JSON(label="info")

    def _available_backends(self) -> list[str]:
        available = getattr(self.engine, "available_backends", None)
        return list(available()) if callable(available) else []

    def _engine_html(self) -> str:
        rows = [("Model", getattr(self.engine, "model_name", "?")), ("Device", self._device()),
                ("Backends", ", ".join(self._available_backends()) or "?")]
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

    # -- the form: components <-> story -----------------------------------------------------------

    @property
    def form(self) -> list[gr.components.Component]:
        """Every component whose value is part of the story, in a fixed order."""
        comps = [self.global_caption, *self.settings.values(), *self.moc_settings.values()]
        for slot in self.slots:
            comps += [slot["caption"], slot["frames"], slot["seed"], slot["locked"], slot["pins"], slot["blocks"]]
        return comps

    @property
    def editor_outputs(self) -> list:
        comps = [self.board, self.global_caption, *self.settings.values(), *self.moc_settings.values()]
        for slot in self.slots:
            comps += [slot["card"], slot["header"], slot["video"], slot["caption"], slot["frames"],
                      slot["seed"], slot["locked"], slot["pins"], slot["blocks"]]
        return comps

    @property
    def result_outputs(self) -> list:
        return [self.status, self.preview, self.story_video, self.render_stats, self.routing_stats, self.engine_info,
                self.layer, self.step, self.frame_plot, self.recall_plot, self.flops_plot, self.density_plot]

    def story_from_form(self, board: Board, data: dict) -> Story:
        """The story as the form shows it (not validated: an empty caption is fine while editing)."""
        settings = replace(board.story.settings,
                           **{k: _int_or_raw(data[c]) for k, c in self.settings.items()},
                           moc=replace(board.story.settings.moc,
                                       **{k: _int_or_raw(data[c]) for k, c in self.moc_settings.items()}))
        shots = [Shot(caption=data[slot["caption"]], frames=_int_or_raw(data[slot["frames"]]),
                      seed=_int_or_raw(data[slot["seed"]]), locked=bool(data[slot["locked"]]),
                      pins=_shot_list(data[slot["pins"]]), blocks=_shot_list(data[slot["blocks"]]))
                 for slot in self.slots[: len(board.story.shots)]]
        return replace(board.story, global_caption=data[self.global_caption], shots=shots, settings=settings)

    def editor_updates(self, board: Board, before: Board | None = None) -> dict:
        """Everything in the editor that shows `board`; slots whose video did not change are skipped."""
        story = board.story
        out: dict = {self.board: board, self.global_caption: story.global_caption}
        out.update({c: getattr(story.settings, k) for k, c in self.settings.items()})
        out.update({c: getattr(story.settings.moc, k) for k, c in self.moc_settings.items()})
        for i, slot in enumerate(self.slots):
            if i >= len(story.shots):
                out[slot["card"]] = gr.Column(visible=False)
                continue
            shot, view = story.shots[i], board.views[i]
            old_video = before.views[i].video if before is not None and i < len(before.views) else "<unknown>"
            out[slot["card"]] = gr.Column(visible=True, elem_classes=_card_classes(view.status, shot.locked))
            out[slot["header"]] = shot_header(i, view, shot)
            if view.video != old_video:
                out[slot["video"]] = view.video
            out[slot["caption"]] = gr.Textbox(value=shot.caption, interactive=not shot.locked)
            out[slot["frames"]] = gr.Number(value=shot.frames, interactive=not shot.locked)
            out[slot["seed"]] = gr.Number(value=shot.seed, interactive=not shot.locked)
            out[slot["locked"]] = shot.locked
            choices = earlier_shots(story, i)
            out[slot["pins"]] = gr.Dropdown(choices=choices, value=list(shot.pins), interactive=not shot.locked)
            out[slot["blocks"]] = gr.Dropdown(choices=choices, value=list(shot.blocks), interactive=not shot.locked)
        return out

    def slot_updates(self, board: Board, indices=None, before: Board | None = None) -> dict:
        """The header, card style and video of some shots (default: all), nothing the user types in:
        during a render the user may keep editing, and the render must not overwrite that."""
        out: dict = {self.board: board}
        for i in range(len(board.views)) if indices is None else indices:
            if 0 <= i < len(board.views):
                view, shot = board.views[i], board.story.shots[i]
                out[self.slots[i]["header"]] = shot_header(i, view, shot)
                out[self.slots[i]["card"]] = gr.Column(elem_classes=_card_classes(view.status, shot.locked))
                old_video = before.views[i].video if before is not None and i < len(before.views) else None
                if view.video and view.video != old_video:
                    out[self.slots[i]["video"]] = view.video
        return out

    def routing_updates(self, board: Board) -> dict:
        routing, summary = board.routing, board.summary
        cards = plots.stat_cards(routing, summary)
        return {
            self.render_stats: cards, self.routing_stats: cards,
            self.layer: gr.Dropdown(choices=plots.layer_choices(routing), value=plots.ALL),
            self.step: gr.Dropdown(choices=plots.step_choices(routing), value=plots.ALL),
            self.frame_plot: plots.frame_heatmap(routing), self.recall_plot: plots.shot_recall(routing),
            self.flops_plot: plots.flops_figure(routing), self.density_plot: plots.density_heatmap(routing),
        }

    # -- events -----------------------------------------------------------------------------------

    def _wire(self) -> None:
        inputs = {self.board, *self.form}
        editor = self.editor_outputs
        quiet = dict(show_progress="hidden", api_visibility="private")

        def edit(op):
            def handler(data):
                board = data[self.board]
                try:
                    current = set_story(board, self.story_from_form(board, data))
                    return self.editor_updates(op(current), before=board)
                except StoryError as error:
                    gr.Warning(readable_story_error(error))
                    return {}
            return handler

        for i, slot in enumerate(self.slots):
            slot["up"].click(edit(lambda b, i=i: move_shot(b, i, -1)), inputs, editor, **quiet)
            slot["down"].click(edit(lambda b, i=i: move_shot(b, i, +1)), inputs, editor, **quiet)
            slot["duplicate"].click(edit(lambda b, i=i: duplicate_shot(b, i)), inputs, editor, **quiet)
            slot["remove"].click(edit(lambda b, i=i: remove_shot(b, i)), inputs, editor, **quiet)
            slot["locked"].input(edit(lambda b: b), inputs, editor, **quiet)  # locked fields turn read-only
            slot["regenerate"].click(self._render_handler(i), inputs, editor + self.result_outputs,
                                     concurrency_limit=None, **quiet)
        self.add_btn.click(edit(lambda b: add_shot(b)), inputs, editor, **quiet)
        self.generate_btn.click(self._render_handler(None), inputs, editor + self.result_outputs,
                                concurrency_limit=None, **quiet)
        self.stop_btn.click(self._stop_ui, None, None, concurrency_limit=None, **quiet)
        self.example.input(self._load_example, [self.board, self.example], editor + self.result_outputs, **quiet)
        self.open_btn.upload(self._open_file, [self.board, self.open_btn], editor + self.result_outputs, **quiet)
        self.save_btn.click(self._save_ui, inputs, [self.saved_file], **quiet)
        for selector in (self.layer, self.step):
            selector.input(lambda board, layer, step: plots.frame_heatmap(board.routing, layer, step),
                           [self.board, self.layer, self.step], self.frame_plot, **quiet)

        # Named endpoints for gradio_client (see docs/API.md).
        api = dict(show_progress="hidden", api_visibility="public")
        self.api_trigger.click(self._api_generate, [self.api_story], [self.api_video, self.api_shot_videos,
                               self.api_result], api_name="generate", concurrency_limit=None, **api)
        self.api_trigger.click(self._api_regenerate, [self.api_story, self.api_shot],
                               [self.api_video, self.api_shot_videos, self.api_result], api_name="regenerate",
                               concurrency_limit=None, **api)
        self.api_trigger.click(self._api_stop, None, [self.api_message], api_name="stop",
                               concurrency_limit=None, **api)
        self.api_trigger.click(self._api_save, [self.api_story], [self.api_file_out], api_name="save_story", **api)
        self.api_trigger.click(self._api_load, [self.api_file_in], [self.api_story_out], api_name="load_story",
                               **api)
        self.api_trigger.click(self._api_example, [self.api_message], [self.api_story_out],
                               api_name="example_story", **api)
        self.api_trigger.click(self._api_info, None, [self.api_info], api_name="info", **api)

    def _load_example(self, board: Board, name: str | None) -> dict:
        if not name or name not in self.examples:
            return {}
        return self._show_loaded(board, Story.from_dict(self.examples[name].to_dict()), f"Loaded example “{name}”.")

    def _open_file(self, board: Board, file) -> dict:
        path = getattr(file, "name", file)
        try:
            story = Story.load(path)
        except StoryError as error:
            gr.Warning(f"Cannot open this story: {readable_story_error(error)}")
            return {}
        return self._show_loaded(board, story, f"Opened {Path(str(path)).name}.")

    def _show_loaded(self, board: Board, story: Story, message: str) -> dict:
        if len(story.shots) > MAX_SHOTS:
            gr.Warning(f"This story has {len(story.shots)} shots; the editor shows at most {MAX_SHOTS}. "
                       "Render it with `python launch.py --story FILE` instead.")
            return {}
        fresh = load_story(board, story)
        out = self.editor_updates(fresh, before=None)
        out.update(self.routing_updates(fresh))
        out.update({self.status: status_html("idle", "Ready", message), self.story_video: None,
                    self.preview: None})
        return out

    def _save_ui(self, data: dict):
        board = data[self.board]
        try:
            story = self.story_from_form(board, data).validate()
            path = self._write_story(story)
        except StoryError as error:
            gr.Warning(f"Cannot save: {readable_story_error(error)}")
            return gr.File(visible=False)
        return gr.File(value=str(path), visible=True)

    def _write_story(self, story: Story) -> Path:
        folder = Path(tempfile.mkdtemp(prefix="story-", dir=self.out_root))
        return story.save(folder / "story.json")

    def _stop_ui(self, request: gr.Request) -> None:
        if self.worker.stop(_session(request)):
            gr.Info("Stopping after the current sampling step…", duration=3)
        else:
            gr.Info("Nothing is running.", duration=3)

    # -- one render: click -> worker -> events -> UI ----------------------------------------------

    def _render_handler(self, regenerate: int | None):
        def handler(request: gr.Request, data: dict) -> Iterator[dict]:
            yield from self._render(request, data, regenerate)
        return handler

    def _events(self, job):
        """The job's events; if the caller goes away (tab closed, client gone), the job is stopped."""
        ended = False
        try:
            for event in self.worker.stream(job):
                ended = isinstance(event, TERMINAL)
                yield event
        finally:
            if not ended:
                job.stop()

    def _render(self, request: gr.Request, data: dict, regenerate: int | None) -> Iterator[dict]:
        before = data[self.board]
        board = set_story(before, self.story_from_form(before, data))
        try:
            story = Story.from_dict(board.story.to_dict())  # a validated copy the worker owns
            job = self.worker.submit(_session(request), story, regenerate)
            board = set_story(board, Story.from_dict(story.to_dict()))
        except StoryError as error:
            message = readable_story_error(error)
            gr.Warning(message)
            yield {self.board: board, self.status: status_html("error", "Check the story", message)}
            return
        except BusyError as error:
            gr.Warning(str(error))
            yield {}
            return
        board = mark_queued(board, regenerate)
        shown = before  # the board whose videos the page shows
        out = self.slot_updates(board, before=shown)
        out[self.status] = status_html("queued", "Queued", "Waiting for the renderer…", 0.0, job=job.id)
        yield out

        started = time.perf_counter()
        what = "the story" if regenerate is None else f"shot {regenerate + 1}"
        for event in self._events(job):
            if isinstance(event, Queued):
                ahead = event.position - 1
                detail = "You are next." if ahead == 0 else f"{ahead} render{'s' * (ahead > 1)} ahead of you."
                yield {self.status: status_html("queued", f"Queued: place {event.position}", detail, 0.0, job=job.id)}
            elif isinstance(event, Started):
                started = time.perf_counter()
                yield {self.status: status_html("running", f"Rendering {what}", "Starting…", 0.0, job=job.id)}
            elif isinstance(event, Progress):
                shots = list(event.shots) or ([event.shot] if event.shot is not None else [])
                changed = [i for i in shots if 0 <= i < len(board.views) and board.views[i].status != "rendering"]
                for i in changed:
                    board = mark_rendering(board, i)
                fraction = (event.run + event.step / max(event.total, 1)) / max(event.runs, 1)
                elapsed = time.perf_counter() - started
                out = self.slot_updates(board, changed) if changed else {}
                out[self.status] = status_html("running", f"Rendering {what}", f"{event.message} · {elapsed:.0f} s",
                                               fraction, job=job.id)
                yield out
            elif isinstance(event, Preview):
                yield {self.preview: preview_strip(event.frames)}
            elif isinstance(event, ShotDone):
                board = apply_shot(board, story, event.result)
                yield self.slot_updates(board, [event.index], before=shown)
                shown = board
            elif isinstance(event, Finished):
                board = apply_result(board, story, event.result)
                board = replace(board, summary={**board.summary,
                                                "shots": [shot_dict(r) for r in event.result.shots],
                                                "cache_saved_s": cache_saved(board, event.result)})
                out = self.slot_updates(board, before=shown)
                out.update(self.routing_updates(board))
                out[self.story_video] = board.story_video
                out[self.engine_info] = self._engine_html()
                elapsed = time.perf_counter() - started
                cached = sum(1 for r in event.result.shots if r.status == "cached")
                detail = f"{len(event.result.shots)} shots in {elapsed:.1f} s · {cached} from the cache"
                out[self.status] = status_html("done", "Done", detail, 1.0, job=job.id)
                yield out
            elif isinstance(event, Stopped):
                board = settle(board)
                out = self.slot_updates(board, before=shown)
                out[self.status] = status_html("stopped", "Stopped", event.message, job=job.id)
                yield out
            elif isinstance(event, Failed):
                board = settle(board)
                gr.Warning(event.message)
                out = self.slot_updates(board, before=shown)
                out[self.status] = status_html("error", "Render failed", event.message, job=job.id)
                yield out

    # -- API endpoints ----------------------------------------------------------------------------

    def _api_story(self, story: Any) -> Story:
        try:
            if isinstance(story, str):
                return Story.from_json(story)
            return Story.from_dict(story)
        except StoryError as error:
            raise gr.Error(f"The story is not valid: {readable_story_error(error)}", print_exception=False) from None

    def _api_generate(self, story: Any, request: gr.Request):
        """Render a whole story. Streams progress dicts as `result`; the last yield carries the videos."""
        yield from self._api_render(self._api_story(story), None, request)

    def _api_regenerate(self, story: Any, shot: float, request: gr.Request):
        """Regenerate shot `shot` (0-based) with the other shots as fixed context."""
        story = self._api_story(story)
        index = _int_or_raw(shot)
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(story.shots):
            raise gr.Error(f"shot must be a shot index in [0, {len(story.shots) - 1}], got {shot!r}"[:200],
                           print_exception=False)
        shot = index
        yield from self._api_render(story, int(shot), request)

    def _api_render(self, story: Story, regenerate: int | None, request: gr.Request):
        try:
            job = self.worker.submit(_session(request), story, regenerate)
        except BusyError as error:
            raise gr.Error(str(error), print_exception=False) from None
        shots: dict[int, dict] = {}
        for event in self._events(job):
            if isinstance(event, Queued):
                yield None, None, {"state": "queued", "position": event.position}
            elif isinstance(event, Progress):
                yield None, None, {"state": "running", "shot": event.shot, "step": event.step,
                                   "total": event.total, "run": event.run, "runs": event.runs,
                                   "message": event.message}
            elif isinstance(event, ShotDone):
                shots[event.index] = shot_dict(event.result)
            elif isinstance(event, Finished):
                result = event.result
                videos = [str(r.video_path) for r in result.shots if r.video_path]
                yield (str(result.story_video) if result.story_video else None, videos or None, {
                    "state": "finished", "shots": [shot_dict(r) for r in result.shots],
                    "summary": _jsonable(result.summary), "routing": routing_summary(result.routing)})
            elif isinstance(event, Stopped):
                yield None, None, {"state": "stopped", "message": event.message,
                                   "finished_shots": list(event.finished_shots),
                                   "steps_after_stop": job.steps_after_stop(),
                                   "shots": [shots[i] for i in sorted(shots)]}
            elif isinstance(event, Failed):
                raise gr.Error(event.message, print_exception=False)

    def _api_stop(self, request: gr.Request) -> str:
        """Stop this client's queued or running render (within one sampling step)."""
        return "stopping" if self.worker.stop(_session(request)) else "nothing to stop"

    def _api_save(self, story: Any) -> str:
        """Validate a story and return it as a JSON file."""
        return str(self._write_story(self._api_story(story)))

    def _api_load(self, story_file) -> dict:
        """Read and validate a story JSON file; returns the story as a dict."""
        path = getattr(story_file, "name", story_file)
        if not path:
            raise gr.Error("No file given.", print_exception=False)
        try:
            return Story.load(path).to_dict()
        except StoryError as error:
            raise gr.Error(f"The story is not valid: {readable_story_error(error)}", print_exception=False) from None

    def _api_example(self, name: str) -> dict:
        """An example story by name ("" for the first one); see /info for the names."""
        if not name:
            return self.initial_story().to_dict()
        if name not in self.examples:
            raise gr.Error(f"No example named {name!r}; examples: {sorted(self.examples)}", print_exception=False)
        return self.examples[name].to_dict()

    def _api_info(self) -> dict:
        """Model, device, attention backends, example names, cache statistics, renders in the queue."""
        return {"model": str(getattr(self.engine, "model_name", "")), "device": self._device(),
                "backends": self._available_backends(), "examples": sorted(self.examples),
                "cache": _jsonable(self._cache_stats()), "queue": self.worker.busy()}


# -- small pure helpers ---------------------------------------------------------------------------

def _session(request: gr.Request | None) -> str:
    session = getattr(request, "session_hash", None)
    return session or "anonymous"


def _int_or_raw(value: Any) -> Any:
    """Number widgets send floats (3.0); keep anything else as is for validation to name."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def _shot_list(value: Any) -> Any:
    """A multiselect's shot indices as ints; anything else as is, for validation to name."""
    if value is None:
        return []
    if isinstance(value, list):
        return [_int_or_raw(v) for v in value]
    return value


def earlier_shots(story: Story, index: int) -> list[tuple[str, int]]:
    """The (label, index) choices a shot's memory pins and blocks offer: the shots before it."""
    out = []
    for j, shot in enumerate(story.shots[:index]):
        caption = " ".join(shot.caption.split())
        out.append((f"Shot {j + 1}" + (f": {caption[:28]}…" if len(caption) > 28 else f": {caption}" if caption else ""), j))
    return out


def _card_classes(status: str, locked: bool) -> list[str]:
    return ["shot-card", f"status-{status}"] + (["locked"] if locked else [])


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def shot_dict(result) -> dict:
    return {"index": result.index, "status": result.status, "seed": result.seed, "seconds": result.seconds,
            "density": result.density, "key": result.key,
            "video": Path(result.video_path).name if result.video_path else None}


def routing_summary(routing: dict | None) -> dict:
    """The scalar part of the routing report (the matrices stay on the server)."""
    return {k: v for k, v in (routing or {}).items() if isinstance(v, (int, float, str, bool))
            or (k in ("shot_frames", "steps", "pins", "blocks") and isinstance(v, list))}


def cache_saved(board: Board, result) -> float:
    """Seconds the cache saved: cached shots cost what they cost when they were generated here,
    estimated as the mean time of the generated shots (per frame) times the cached frames."""
    generated = [(r.seconds, board.story.shots[r.index].frames) for r in result.shots
                 if r.status == "generated" and r.seconds and r.index < len(board.story.shots)]
    cached_frames = sum(board.story.shots[r.index].frames for r in result.shots
                        if r.status == "cached" and r.index < len(board.story.shots))
    if not generated or not cached_frames:
        return 0.0
    per_frame = sum(s for s, _ in generated) / max(sum(f for _, f in generated), 1)
    return per_frame * cached_frames


def readable_story_error(error: StoryError) -> str:
    """'shots[1].caption: must not be empty' -> 'Shot 2 › caption: must not be empty'."""
    text = str(error)
    field_path = getattr(error, "field", "")
    if field_path and text.startswith(field_path + ": "):
        text = text[len(field_path) + 2:]
    pretty = field_path
    if field_path.startswith("shots[") and "]" in field_path:
        index, _, rest = field_path[len("shots["):].partition("]")
        if index.isdigit():
            pretty = f"Shot {int(index) + 1}" + (f" › {rest.lstrip('.')}" if rest else "")
    pretty = pretty.replace("settings.moc.", "MoC › ").replace("settings.", "Settings › ")
    return f"{pretty}: {text}" if pretty else text


def shot_header(i: int, view, shot: Shot | None) -> str:
    """Card header: number, status pill, lock badge; then the seed used, render time and density."""
    status = view.status if view is not None else "new"
    label = STATUSES.get(status, status)
    seed = f"seed {view.seed}" if view is not None and view.seed is not None else ""
    bits = []
    if view is not None and view.seconds:
        bits.append(f"{view.seconds:.1f} s")
    if view is not None and view.density is not None and view.density < 0.999:
        bits.append(f"attention {view.density:.0%}")
    lock = '<span class="lock-badge" title="Locked: Generate keeps this take">locked</span>' if shot and shot.locked else ""
    return (f'<div class="shot-head"><span class="shot-num">Shot {i + 1}</span>'
            f'<span class="pill pill-{html.escape(status)}" data-status="{html.escape(status)}">{html.escape(label)}</span>'
            f'{lock}<span class="shot-meta" title="the seed this take was drawn with">{html.escape(seed)}</span>'
            f'<span class="shot-meta" title="render time · share of keys attended">{html.escape(" · ".join(bits))}</span>'
            f'</div>')


def status_html(kind: str, title: str, detail: str = "", fraction: float | None = None, job: int = 0) -> str:
    """The status box: a title, one line of detail and (while rendering) a progress bar."""
    bar = ""
    if fraction is not None:
        pct = max(0.0, min(1.0, float(fraction))) * 100
        bar = f'<div class="bar"><div class="bar-fill" style="width:{pct:.1f}%"></div></div>'
    return (f'<div class="status status-{html.escape(kind)}" data-kind="{html.escape(kind)}" data-job="{int(job)}">'
            f'<div class="status-title">{html.escape(title)}</div>'
            f'<div class="status-detail">{html.escape(detail)}</div>{bar}</div>')


def preview_strip(frames: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) uint8 -> one (H', W' * n, 3) image of up to PREVIEW_FRAMES evenly spaced frames."""
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    picks = np.unique(np.linspace(0, len(frames) - 1, min(PREVIEW_FRAMES, len(frames))).round().astype(int))
    gap = np.full((frames.shape[1], 2, 3), 255, dtype=np.uint8)
    strip = np.concatenate([x for i in picks for x in (frames[i].astype(np.uint8), gap)][:-1], axis=1)
    scale = max(1, int(np.ceil(PREVIEW_MIN_HEIGHT / max(strip.shape[0], 1))))
    return strip.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else strip


THEME = gr.themes.Soft(
    primary_hue="violet", secondary_hue="slate", neutral_hue="slate",
    font=[gr.themes.LocalFont("IBM Plex Sans"), "ui-sans-serif", "system-ui", "sans-serif"],
).set(
    block_radius="12px", button_large_radius="10px", button_small_radius="8px",
    block_title_background_fill="none", block_title_background_fill_dark="none", block_title_padding="0",
    block_title_text_color="*neutral_700", block_title_text_color_dark="*neutral_200",
    block_title_text_weight="600", block_label_background_fill="*background_fill_primary",
    button_primary_background_fill="*primary_600", button_primary_background_fill_hover="*primary_700",
    button_primary_text_color="white",
)

CSS = """
.gradio-container { max-width: 1480px !important; }
#app-header { padding: 0; }
.brand { display: flex; align-items: center; gap: 14px; padding: 6px 2px 10px; }
.brand-mark { background: linear-gradient(135deg, #7c3aed, #2563eb); color: white; font-weight: 700;
  border-radius: 12px; padding: 10px 12px; letter-spacing: .5px; }
.brand-title { font-size: 22px; font-weight: 700; line-height: 1.1; }
.brand-sub { color: var(--body-text-color-subdued); font-size: 13px; }
.brand-model { margin-left: auto; display: flex; gap: 8px; }
.brand-model span { background: var(--background-fill-secondary); border: 1px solid var(--border-color-primary);
  border-radius: 999px; padding: 3px 10px; font-size: 12px; color: var(--body-text-color-subdued); }
.shot-grid { flex-wrap: wrap !important; gap: 12px !important; align-items: stretch; }
.shot-card { border: 1px solid var(--border-color-primary); border-radius: 14px; padding: 10px !important;
  background: var(--background-fill-primary); box-shadow: 0 1px 3px rgba(15,23,42,.06); gap: 6px !important;
  flex: 0 1 calc(25% - 10px) !important; min-width: 190px !important; }
.shot-card .shot-fields { gap: 6px !important; flex-wrap: nowrap !important; }
.shot-card .shot-fields > * { min-width: 0 !important; }
.shot-card .shot-fields .form { flex-wrap: nowrap !important; border: none !important; background: none !important;
  gap: 6px !important; }
.shot-card .shot-fields .block { padding: 0 !important; border: none !important; box-shadow: none !important; }
.shot-card .shot-fields input { border: 1px solid var(--border-color-primary) !important; border-radius: 8px !important; }
.shot-card .shot-fields [data-testid=block-info] { font-size: 12px !important; margin-bottom: 2px; }
.shot-card [id^=shot-frames-] { flex: 0 0 60px !important; min-width: 0 !important; }
.shot-card [id^=shot-seed-] { flex: 1 1 0 !important; min-width: 0 !important; }
.shot-card.status-rendering { border-color: #7c3aed; box-shadow: 0 0 0 2px rgba(124,58,237,.25); }
.shot-card.status-stale { border-color: #f59e0b; }
.shot-card.locked { background: var(--background-fill-secondary); }
.shot-head { display: flex; align-items: center; gap: 2px 8px; flex-wrap: wrap; }
.shot-num { font-weight: 700; font-size: 15px; }
.shot-meta { color: var(--body-text-color-subdued); font-size: 12px; width: 100%; min-height: 16px;
  white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.pill { border-radius: 999px; padding: 1px 9px; font-size: 12px; font-weight: 600; }
.pill-new { background: #f1f5f9; color: #64748b; }
.pill-queued { background: #e0e7ff; color: #3730a3; }
.pill-rendering { background: #ede9fe; color: #6d28d9; }
.pill-generated { background: #dcfce7; color: #166534; }
.pill-cached { background: #dbeafe; color: #1e40af; }
.pill-stale { background: #fef3c7; color: #92400e; }
.lock-badge { font-size: 11px; border: 1px solid #94a3b8; color: #475569; border-radius: 6px; padding: 0 6px; }
.shot-actions { flex-wrap: nowrap !important; gap: 6px !important; align-items: center; }
.shot-actions > * { min-width: 0 !important; }
.shot-actions button { padding: 3px 4px !important; font-size: 12px !important; }
.shot-card input[type=number] { padding-left: 8px !important; padding-right: 4px !important; }
.regen button, button.regen { width: 100%; }
.add-shot { border-style: dashed !important; }
.render-panel { position: sticky; top: 8px; align-self: flex-start; }
.status { border-radius: 12px; padding: 12px 14px; border: 1px solid var(--border-color-primary);
  background: var(--background-fill-secondary); }
.status-title { font-weight: 700; }
.status-detail { font-size: 13px; color: var(--body-text-color-subdued); margin-top: 2px; }
.status-running { border-color: #a78bfa; } .status-done { border-color: #86efac; }
.status-error { border-color: #fca5a5; background: #fef2f2; } .status-stopped { border-color: #fcd34d; }
.bar { height: 8px; border-radius: 999px; background: #e2e8f0; margin-top: 10px; overflow: hidden; }
.bar-fill { height: 100%; background: linear-gradient(90deg, #7c3aed, #2563eb); transition: width .25s; }
.stat-row { display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 8px; }
#routing-stats .stat-row { grid-template-columns: repeat(4, minmax(0, 1fr)); }
.stat-card { border: 1px solid var(--border-color-primary); border-radius: 12px; padding: 10px 12px; }
.stat-label { font-size: 12px; color: var(--body-text-color-subdued); text-transform: uppercase; letter-spacing: .4px; }
.stat-value { font-size: 22px; font-weight: 700; margin: 2px 0; }
.stat-note { font-size: 12px; color: var(--body-text-color-subdued); }
.engine-info { border-collapse: collapse; width: 100%; font-size: 13px; }
.engine-info th, .engine-info td { border: none !important; border-bottom: 1px solid var(--border-color-primary) !important;
  padding: 6px 8px; text-align: left; }
.engine-info th { color: var(--body-text-color-subdued); font-weight: 500; width: 30%; }
.muted { color: var(--body-text-color-subdued); }
.hint { color: var(--body-text-color-subdued); font-size: 12px; }
"""
