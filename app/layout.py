"""The layout: every component of the storyboard app, built once per `StoryboardApp.build`.

For: the header, the Storyboard tab (story, shot cards with their Memory section, preview, the
result), the Routing tab's plots and the Settings tab. Events are wired by app/events.py
(`_wire`), the API's hidden components by app/api.py.
Not for: what happens on a click (events.py) or drawing plots (plots.py).
"""

from __future__ import annotations

import html
from typing import Any

import gradio as gr

from engine.story import ANCHORS, CHUNKINGS, Story

from . import plots
from .state import MAX_SHOTS, new_board
from .views import earlier_shots, is_default_model, model_note, shot_header, status_html


class Layout:
    """StoryboardApp's layout methods (a mixin: the state lives on StoryboardApp)."""

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
                        gr.Markdown(model_note(trained=bool(getattr(self.engine.model, "trained", True)),
                                               caveat=str(getattr(self.engine.model, "caveat", ""))),
                                    elem_classes="hint")
                with gr.Row(elem_classes="shot-grid", equal_height=False):
                    self.slots = [self._build_slot(i, story) for i in range(MAX_SHOTS)]
                self._build_compare()  # app/takes.py
                self.add_btn = gr.Button("+ Add shot", elem_id="add-shot", elem_classes="add-shot")
                gr.Markdown("Frames are latent frames. Seed −1 draws a random seed; the seed used is shown on "
                            "the card, and locking a shot keeps that take when you generate again.",
                            elem_classes="hint")
            with gr.Column(scale=4, min_width=340, elem_classes="render-panel"):
                with gr.Row():
                    self.generate_btn = gr.Button("Generate story", variant="primary", size="lg",
                                                  scale=3, elem_id="generate")
                    self.stop_btn = gr.Button("Stop", variant="stop", size="lg", scale=1, elem_id="stop")
                self.both_sides = gr.Checkbox(True, label="Regenerate a shot with the shots after it as context "
                                              "(they stay as they are and are not marked stale)",
                                              elem_id="both-sides", container=False)
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
            slot.update(self._build_takes(i))  # app/takes.py
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
        self._build_recall()  # app/recall.py: what each shot remembered, linked to the heatmap below
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

