"""Plotly figures and stat cards drawn from the engine's routing report.

For: the Routing tab of the app: which key frames each query frame selected (with shot boundaries
drawn, for one layer or all, one denoising step or all), which earlier shots each shot drew on,
density per layer × head, and the numbers a user cares about (sparsity, attention FLOPs against
dense attention, time saved by the shot cache).
Not for: computing routing (engine/moc) or anything with a browser session; every function here
is pure (routing dict in, figure or HTML out) so tests can call it without a server.

The report (engine/engine.py) looks like:
    {"shot_frames": [5, 4, ...], "num_layers": L, "num_heads": H, "steps": [0, 4, ...],
     "frame_selection": {"all": F×F, "<step>": {"all": F×F, "<layer>": F×F}},
     "shot_recall": S×S, "density": L×H, "sparsity": float,
     "pins": [[query shot, key shot], ...], "blocks": [[query shot, key shot], ...],
     "attn_flops_moc": float, "attn_flops_dense": float, ...}
Rows are query frames, columns key frames; values are selection frequencies in [0, 1].
"""

from __future__ import annotations

import html
import math
from typing import Any

import numpy as np
import plotly.graph_objects as go

ALL = "all"  # the layer / step choice that averages over every layer / step

# One palette for every figure: dark ink on white, a single sequential scale (no rainbow).
INK = "#1f2937"
MUTED = "#6b7280"
GRID = "#e5e7eb"
ACCENT = "#7c3aed"
SCALE = [[0.0, "#f8fafc"], [0.15, "#ddd6fe"], [0.45, "#a78bfa"], [0.75, "#6d28d9"], [1.0, "#2e1065"]]
FONT = dict(family="Inter, ui-sans-serif, system-ui, sans-serif", size=12, color=INK)


def _layout(fig: go.Figure, title: str, height: int = 420, top: int = 50) -> go.Figure:
    """Shared look; `top` leaves room for an x axis drawn above the plot."""
    fig.update_layout(
        title=dict(text=title, x=0.01, xanchor="left", y=0.98, yanchor="top", font=dict(size=15)),
        font=FONT, height=height, margin=dict(l=60, r=20, t=top, b=30),
        paper_bgcolor="white", plot_bgcolor="white",
    )
    return fig


def empty_figure(message: str, title: str = "") -> go.Figure:
    """A blank figure that says why there is nothing to show yet."""
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font=dict(size=14, color=MUTED))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, title, height=320)


def _matrix(value: Any) -> np.ndarray | None:
    if value is None:
        return None
    array = np.asarray(value, dtype=np.float64)
    return array if array.ndim == 2 and array.size else None


def shot_boundaries(shot_frames: list[int]) -> list[int]:
    """Frame indices where a new shot starts (excluding 0): [5, 4, 6] -> [5, 9]."""
    return [int(x) for x in np.cumsum(shot_frames)[:-1]] if shot_frames else []


def shot_of_frame(shot_frames: list[int]) -> list[int]:
    """Shot index of every frame: [2, 3] -> [0, 0, 1, 1, 1]."""
    return [s for s, n in enumerate(shot_frames) for _ in range(int(n))]


def layer_choices(routing: dict | None) -> list[str]:
    """Dropdown values for the layer selector: "all" then "0".."L-1"."""
    num_layers = int((routing or {}).get("num_layers") or 0)
    return [ALL] + [str(i) for i in range(num_layers)]


def step_choices(routing: dict | None) -> list[str]:
    """Dropdown values for the step selector: "all" then each recorded denoising step."""
    steps = (routing or {}).get("steps") or []
    return [ALL] + [str(s) for s in steps]


def frame_selection(routing: dict, layer: str = ALL, step: str = ALL) -> np.ndarray | None:
    """The F×F selection-frequency matrix for one (layer, step) choice, or None if not recorded.

    The report nests step -> layer; a layer without a step is the mean of that layer over steps.
    """
    table = routing.get("frame_selection") or {}
    layer, step = str(layer), str(step)
    if step == ALL and layer == ALL:
        return _matrix(table.get(ALL))
    if step != ALL:
        per_step = table.get(step) or {}
        return _matrix(per_step.get(layer if layer != ALL else ALL))
    stacked = [m for s in (routing.get("steps") or [])
               if (m := _matrix((table.get(str(s)) or {}).get(layer))) is not None]
    return np.mean(stacked, axis=0) if stacked else None


def frame_heatmap(routing: dict | None, layer: str = ALL, step: str = ALL) -> go.Figure:
    """Query frame × key frame selection frequency, shot boundaries drawn as lines."""
    title = "Which key frames each query frame attends to"
    if not routing:
        return empty_figure("Generate a story to see where attention goes.", title)
    matrix = frame_selection(routing, layer, step)
    if matrix is None:
        return empty_figure(f"No routing recorded for layer {layer}, step {step}.", title)
    shot_frames = [int(n) for n in routing.get("shot_frames") or [matrix.shape[0]]]
    owner = shot_of_frame(shot_frames)
    if len(owner) != matrix.shape[0]:
        owner = [0] * matrix.shape[0]
    labels = [f"frame {i} · shot {owner[i] + 1}" for i in range(matrix.shape[0])]
    hover = [[f"query {labels[i]}<br>key {labels[j]}<br>selected {matrix[i, j]:.0%}"
              for j in range(matrix.shape[1])] for i in range(matrix.shape[0])]
    fig = go.Figure(go.Heatmap(
        z=matrix, zmin=0.0, zmax=1.0, colorscale=SCALE, text=hover, hoverinfo="text",
        colorbar=dict(title=dict(text="selected", side="right"), tickformat=".0%", thickness=12),
    ))
    n = matrix.shape[0]
    for b in shot_boundaries(shot_frames):
        edge = b - 0.5
        fig.add_shape(type="line", x0=edge, x1=edge, y0=-0.5, y1=n - 0.5, line=dict(color=ACCENT, width=2))
        fig.add_shape(type="line", y0=edge, y1=edge, x0=-0.5, x1=n - 0.5, line=dict(color=ACCENT, width=2))
    starts = [0] + shot_boundaries(shot_frames)
    centers = [s + (k - 1) / 2 for s, k in zip(starts, shot_frames)]
    names = [f"S{i + 1}" for i in range(len(shot_frames))]
    _draw_links(fig, routing, starts, shot_frames)
    fig.update_xaxes(title="key frame", tickmode="array", tickvals=centers, ticktext=names,
                     showgrid=False, zeroline=False, side="top")
    fig.update_yaxes(title="query frame", tickmode="array", tickvals=centers, ticktext=names,
                     showgrid=False, zeroline=False, autorange="reversed", scaleanchor="x")
    which = f"layer {layer}" if layer != ALL else "all layers"
    when = f"step {step}" if step != ALL else "all steps"
    return _layout(fig, f"{title} · {which} · {when}", height=540, top=90)


PIN_COLOUR, BLOCK_COLOUR = "#0ea5e9", "#ef4444"


def links(routing: dict | None, name: str) -> list[tuple[int, int]]:
    """The report's memory pins or blocks as (query shot, key shot) pairs (none in old reports)."""
    out = []
    for pair in (routing or {}).get(name) or []:
        if isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, int) for x in pair):
            out.append((pair[0], pair[1]))
    return out


def _draw_links(fig: go.Figure, routing: dict, starts: list[int], shot_frames: list[int]) -> None:
    """Outline pinned (forced by the user) and blocked query-shot x key-shot blocks, apart from routing."""
    for name, colour, dash, label in (("pins", PIN_COLOUR, "solid", "pinned"), ("blocks", BLOCK_COLOUR, "dot", "blocked")):
        for a, b in links(routing, name):
            if max(a, b) >= len(shot_frames):
                continue
            fig.add_shape(type="rect", x0=starts[b] - 0.5, x1=starts[b] + shot_frames[b] - 0.5,
                          y0=starts[a] - 0.5, y1=starts[a] + shot_frames[a] - 0.5,
                          line=dict(color=colour, width=3, dash=dash), name=f"{label} S{a + 1}→S{b + 1}")
            fig.add_annotation(x=starts[b] + (shot_frames[b] - 1) / 2, y=starts[a] + (shot_frames[a] - 1) / 2,
                               text=label, showarrow=False, font=dict(color=colour, size=12),
                               bgcolor="rgba(255,255,255,0.8)")


def shot_recall(routing: dict | None) -> go.Figure:
    """Shot × shot: how often each shot's queries selected chunks of every (earlier) shot."""
    title = "Which shots each shot drew on"
    matrix = _matrix((routing or {}).get("shot_recall"))
    if matrix is None:
        return empty_figure("Generate a story with two or more shots to see shot recall.", title)
    names = [f"Shot {i + 1}" for i in range(matrix.shape[0])]
    text = [[f"{v:.0%}" for v in row] for row in matrix]
    fig = go.Figure(go.Heatmap(
        z=matrix, x=names, y=names, zmin=0.0, zmax=max(1.0, float(matrix.max())), colorscale=SCALE,
        text=text, texttemplate="%{text}", hovertemplate="%{y} drew on %{x}: %{text}<extra></extra>",
        colorbar=dict(tickformat=".0%", thickness=12),
    ))
    for name, mark in (("pins", "pinned"), ("blocks", "blocked")):  # forced links are not routing picks:
        for a, b in links(routing, name):  # the cell says why it reads as it does
            if max(a, b) < matrix.shape[0]:
                text[a][b] = f"{mark} · routed {text[a][b]}"
    fig.data[0].text = text
    fig.update_xaxes(title="key shot (drawn on)", side="top", showgrid=False)
    fig.update_yaxes(title="query shot", autorange="reversed", showgrid=False)
    return _layout(fig, title, height=400, top=90)


def density_heatmap(routing: dict | None) -> go.Figure:
    """Fraction of keys each (layer, head) attended to: 1.0 is dense attention."""
    title = "Attention density per layer × head"
    matrix = _matrix((routing or {}).get("density"))
    if matrix is None:
        return empty_figure("Generate a story to see density per layer and head.", title)
    fig = go.Figure(go.Heatmap(
        z=matrix, x=[f"h{h}" for h in range(matrix.shape[1])], y=[f"L{l}" for l in range(matrix.shape[0])],
        zmin=0.0, zmax=1.0, colorscale=SCALE, texttemplate="%{z:.0%}",
        hovertemplate="layer %{y}, head %{x}: %{z:.1%} of keys<extra></extra>",
        colorbar=dict(tickformat=".0%", thickness=12),
    ))
    fig.update_xaxes(title="head", side="top", showgrid=False)
    fig.update_yaxes(title="layer", autorange="reversed", showgrid=False)
    return _layout(fig, title, height=max(280, 110 + 34 * matrix.shape[0]), top=90)


def flops_figure(routing: dict | None) -> go.Figure:
    """Attention FLOPs of this render with MoC against the same render with dense attention."""
    title = "Attention FLOPs: MoC vs dense"
    routing = routing or {}
    moc, dense = routing.get("attn_flops_moc"), routing.get("attn_flops_dense")
    if not moc or not dense:
        return empty_figure("No FLOP count yet.", title)
    fig = go.Figure(go.Bar(
        x=[float(dense), float(moc)], y=["dense", "MoC"], orientation="h",
        marker_color=[GRID, ACCENT], text=[_flops(dense), _flops(moc)], textposition="auto",
        hovertemplate="%{y}: %{text}<extra></extra>",
    ))
    fig.update_xaxes(title="FLOPs", showgrid=True, gridcolor=GRID)
    return _layout(fig, title, height=220)


def _flops(value: float) -> str:
    value = float(value)
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} FLOP"


def _seconds(value: float) -> str:
    value = float(value)
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"


BACKEND_NAMES = {"dense-auto": "dense (faster at this size)", "dense": "dense masked SDPA",
                 "triton": "Triton", "reference": "reference", "flex": "FlexAttention", "sdpa": "SDPA",
                 "chunked": "chunked (CPU)", "gather": "Triton, per key chunk"}


def headline_numbers(routing: dict | None, summary: dict | None) -> dict[str, str]:
    """The numbers on the stat cards, formatted; missing ones are "–".

    time_saved: what dense attention would have added (routing "time_saved_estimate_s");
    cache: shots served from the shot cache, and the render time that saved (summary
    "cache_saved_s", estimated by the app from the generated shots' seconds per frame).
    """
    routing, summary = routing or {}, summary or {}
    out = {"sparsity": "–", "flops": "–", "time_saved": "–", "cache": "–", "cache_note": "reused, not re-rendered",
           "sparsity_note": "of attention skipped by MoC"}
    backends = routing.get("backends") or {}
    if backends:  # which attention ran; "dense-auto": auto judged dense faster at this size
        names = [BACKEND_NAMES.get(name, name) for name, _ in sorted(backends.items(), key=lambda kv: -kv[1])]
        out["sparsity_note"] += f" · ran on {', '.join(names)}"
    sparsity = routing.get("sparsity")
    if sparsity is not None and math.isfinite(float(sparsity)):
        out["sparsity"] = f"{float(sparsity):.0%}"
    moc, dense = routing.get("attn_flops_moc"), routing.get("attn_flops_dense")
    if moc and dense:
        out["flops"] = f"{float(dense) / float(moc):.1f}× fewer"
    saved = routing.get("time_saved_estimate_s")
    if saved is not None:
        out["time_saved"] = _seconds(saved)
    shots = summary.get("shots")
    if isinstance(shots, list) and shots:
        cached = sum(1 for s in shots if isinstance(s, dict) and s.get("status") == "cached")
        out["cache"] = f"{cached} of {len(shots)} shots"
        if summary.get("cache_saved_s"):
            out["cache_note"] = f"reused, ~{_seconds(summary['cache_saved_s'])} of rendering saved"
    return out


def stat_cards(routing: dict | None, summary: dict | None) -> str:
    """HTML cards with the headline numbers (the app styles `.stat-card`)."""
    numbers = headline_numbers(routing, summary)
    cards = [
        ("Sparsity", numbers["sparsity"], numbers["sparsity_note"]),
        ("Attention FLOPs", numbers["flops"], "than dense attention"),
        ("Time saved", numbers["time_saved"], "in attention vs dense (estimate)"),
        ("From cache", numbers["cache"], numbers["cache_note"]),
    ]
    body = "".join(
        f'<div class="stat-card"><div class="stat-label">{html.escape(label)}</div>'
        f'<div class="stat-value">{html.escape(value)}</div>'
        f'<div class="stat-note">{html.escape(note)}</div></div>'
        for label, value, note in cards
    )
    return f'<div class="stat-row">{body}</div>'
