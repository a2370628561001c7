"""The recall view's pure helpers: captions, the summary line and the heatmap outline."""

import numpy as np

from app import plots
from app.recall import caption, highlight, layer_of, summary_html
from engine.recall import Recall, RecalledFrame, recall


def report() -> dict:
    """2 shots of 2 and 3 frames; shot 1's frames 2..4 route into shot 0's frames 0 and 1."""
    routed = np.zeros((1, 5, 5))
    routed[0, 2:5, 0] = [1.0, 0.0, 1.0]
    routed[0, 2:5, 1] = [1.0, 2.0, 1.0]
    selection = np.eye(5).tolist()
    return {"shot_frames": [2, 3], "num_layers": 1, "num_heads": 1, "steps": [0], "frame_routed": routed.tolist(),
            "routed_shots": [True, True], "pins": [], "blocks": [[1, 0]],
            "frame_selection": {"all": selection, "0": {"all": selection, "0": selection}}}


def test_caption_numbers_from_one_and_rounds_the_share():
    assert caption(RecalledFrame(shot=1, frame=2, share=0.1849, picks=0.3)) == "shot 2 · frame 3 · 18 %"
    assert layer_of("all") is None and layer_of("3") == 3


def test_the_heatmap_outlines_the_query_rows_and_the_recalled_columns():
    routing = report()
    for frame, rows in ((None, (1.5, 4.5)), (1, (2.5, 3.5))):
        result = recall(routing, 1, frame=frame)
        fig = highlight(plots.frame_heatmap(routing), routing, result)
        query = [s for s in fig.layout.shapes if s.name == "recall query"]
        keys = sorted((s.x0, s.x1) for s in fig.layout.shapes if (s.name or "").startswith("recall key"))
        assert [(query[0].y0, query[0].y1)] == [rows]
        assert keys == [(-0.5, 0.5), (0.5, 1.5)] if frame is None else keys == [(0.5, 1.5)]
    assert [(f.frame, round(f.share, 3)) for f in recall(routing, 1).frames] == [(1, 0.667), (0, 0.333)]


def test_the_summary_says_what_is_selected_and_why_nothing_shows():
    routing = report()
    text = summary_html(recall(routing, 1, frame=2))
    assert 'data-shot="1"' in text and 'data-frame="2"' in text and "frame 3" in text and "blocked: shot 1" in text
    assert "no earlier shot" in summary_html(recall(routing, 0))
    old = Recall(1, None, None, [], 0.0, 0.0, recorded=False)
    assert "regenerate shot 2" in summary_html(old)
