"""What the app shows, as pure functions: shot headers, status lines, preview strips, the note on
what the default model knows, readable errors, the theme and CSS.

For: app/layout.py, app/events.py and app/api.py (the StoryboardApp parts) and the tests; every
function here takes plain values and returns HTML, arrays or dicts (no Gradio events, no engine).
Not for: building components (layout.py) or handling events (events.py).
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from engine.model import DEFAULT_MODEL_DIR, model_identity
from engine.shapestory.world import (ACTION_WORDS, ACTIONS, COLOURS, FRAMING_WORDS, MAX_CHARACTERS, PATTERNS, SHAPES,
                                     SIZES, WORLDS, Character)
from engine.story import Shot, Story, StoryError

from .state import STATUSES, Board

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


def model_note(trained: bool = True, caveat: str = "") -> str:
    """What the default model understands, in Markdown, built from the ShapeStory vocabulary
    (engine/shapestory/world.py) so that the note grows with it; `caveat` (the model folder's own
    word on what it cannot do yet) follows it."""
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
    elif caveat:
        note += f" *{caveat}*"
    return note


def is_default_model(engine) -> bool:
    """Whether `engine` runs the shipped default model (same content as assets/default_model)."""
    identity = getattr(getattr(engine, "model", None), "identity", None)
    return identity is not None and DEFAULT_MODEL_DIR.is_dir() and identity == model_identity(DEFAULT_MODEL_DIR)


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
#recall-frames .caption-label, #recall-query-frames .caption-label { max-width: none; left: var(--block-label-margin);
  white-space: normal; opacity: .9; font-size: 11px; }
#recall-frames .thumbnail-item img, #recall-query-frames .thumbnail-item img { image-rendering: pixelated; }
.recall-summary { font-size: 13px; padding: 6px 4px; }
"""
