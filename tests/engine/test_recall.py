"""What a shot remembered: the ranking on hand-built routing statistics, the recorder's routed
picks on a hand-built Selection, and the pictures of a real tiny-model render."""

import numpy as np
import pytest
import torch

from engine.codec import middle_video_frame, video_frames_of_latent
from engine.moc import Selection, TokenLayout
from engine.moc.routing import MoCConfig, forced_links, route
from engine.recall import recall, thumbnail, with_thumbnails
from engine.routing_report import RoutingRecorder, ShotRouting, build_report

from .conftest import tiny_story


def hand_report() -> dict:
    """3 shots of 2, 1, 2 frames (F = 5), 2 layers; shot 2 (frames 3, 4) routed picks by hand."""
    routed = np.zeros((2, 5, 5))
    # layer 0: query frame 3 -> frame 0 (shot 0) 1.0, frame 2 (shot 1) 1.0; frame 4 -> frame 1 2.0
    routed[0, 3, [0, 2]] = 1.0
    routed[0, 4, 1] = 2.0
    # layer 1: query frame 3 -> frame 0 0.5 and, inside its own shot, nothing; frame 4 -> frame 2 1.5
    routed[1, 3, 0] = 0.5
    routed[1, 4, 2] = 1.5
    routed[1, 4, 3] = 0.5  # own shot (anchor "chunk"): reported apart, never ranked
    routed[0, 2, 0] = 2.0  # shot 1's row: other queries, must not count for shot 2
    return {"shot_frames": [2, 1, 2], "num_layers": 2, "num_heads": 1, "frame_routed": routed.tolist(),
            "routed_shots": [True, True, True], "pins": [[2, 0]], "blocks": [[1, 0]]}


def shares(result) -> dict:
    return {(f.shot, f.frame): round(f.share, 6) for f in result.frames}


def test_shares_sum_to_one_over_other_shots_ranked_highest_first():
    result = recall(hand_report(), 2)
    # all layers, all frames: picks per frame (mean over 2 query frames, then over 2 layers):
    # frame 0: (1 + 0.5) / 4 = 0.375; frame 1: 2 / 4 = 0.5; frame 2: (1 + 1.5) / 4 = 0.625 -> total 1.5
    assert shares(result) == {(1, 0): round(0.625 / 1.5, 6), (0, 1): round(0.5 / 1.5, 6), (0, 0): 0.25}
    assert [(f.shot, f.frame) for f in result.frames] == [(1, 0), (0, 1), (0, 0)]
    assert sum(f.share for f in result.frames) == pytest.approx(1.0)
    assert result.routed_picks == pytest.approx(1.5)
    assert result.own_shot_picks == pytest.approx(0.5 / 4)  # routed inside the own shot: apart
    assert all(f.shot != 2 for f in result.frames)
    assert result.pinned == [0] and result.blocked == [] and result.recorded


def test_narrowing_to_a_layer_and_to_a_query_frame():
    report = hand_report()
    assert shares(recall(report, 2, layer=0)) == {(0, 1): 0.5, (0, 0): 0.25, (1, 0): 0.25}
    assert shares(recall(report, 2, layer=1)) == {(1, 0): 0.75, (0, 0): 0.25}
    # story frame 4 only: layer 0 puts 2.0 on frame 1, layer 1 puts 1.5 on frame 2 (and 0.5 in its own shot)
    assert shares(recall(report, 2, frame=1)) == {(0, 1): round(2 / 3.5, 6), (1, 0): round(1.5 / 3.5, 6)}
    assert shares(recall(report, 2, layer=1, frame=0)) == {(0, 0): 1.0}
    assert recall(report, 2, layer=1, frame=0).routed_picks == pytest.approx(0.5)
    assert shares(recall(report, 1)) == {(0, 0): 1.0}  # shot 1's own row, not shot 2's


def test_forced_links_are_not_ranked_and_unrecorded_takes_say_so():
    report = hand_report()
    report["frame_routed"] = np.zeros((2, 5, 5)).tolist()  # only forced links (pins, anchors) were attended
    result = recall(report, 2)
    assert result.frames == [] and result.routed_picks == 0 and result.pinned == [0]
    assert not recall(hand_report() | {"routed_shots": [True, True, False]}, 2).recorded
    for bad in (dict(shot=3), dict(shot=2, layer=2), dict(shot=2, frame=2), dict(shot=2, frame=True)):
        with pytest.raises(ValueError, match="must be an integer"):
            recall(report, **bad)


def test_recorder_counts_routed_picks_per_query_frame_and_layer_not_forced_links():
    """Shot 2's tokens route by hand; the own-shot anchor and a pin are forced and must not show."""
    layout = TokenLayout(frame_tokens=2, shot_frames=(2, 2, 2))  # 3 shots x 2 frames x 2 tokens, chunk = frame
    config = MoCConfig(top_k=2, pins=((2, 1),))  # shot 2 always sees shot 1: forced, never a routed pick
    routed = torch.full((1, 2, 12, 2), -1, dtype=torch.int32)  # (B, H, Nq, R)
    routed[0, 0, 8:10] = torch.tensor([0, 1], dtype=torch.int32)  # head 0, frame 4 -> frames 0 and 1
    routed[0, 1, 8:10] = torch.tensor([0, -1], dtype=torch.int32)  # head 1, frame 4 -> frame 0
    routed[0, :, 10:12, 0] = 1  # frame 5, both heads -> frame 1
    selection = Selection.build(layout, config.tile, forced_links(layout, config), routed, 0)
    recorder = RoutingRecorder(layout, [0, 1, 2], 0, num_layers=2, num_heads=2, steps=1)
    recorder.begin_step(0)
    recorder.record(0, selection, head_dim=4)
    take = recorder.shot_routing(2)
    assert take.routed_frames.shape == (2, 2, 6)
    expected = np.zeros((2, 6))
    expected[0, 0], expected[0, 1] = 2 / 2, 1 / 2  # per (query token, head): 2 tokens x 2 heads route
    expected[1, 1] = 1.0
    np.testing.assert_allclose(take.routed_frames[0], expected)
    np.testing.assert_allclose(take.routed_frames[1], 0.0)  # layer 1 never ran
    stored = ShotRouting.from_stored(take.tensors(), take.meta())
    np.testing.assert_array_equal(stored.routed_frames, take.routed_frames)
    report = build_report([2, 2, 2], [None, None, stored], 2, 2, [0])
    assert report["routed_shots"] == [False, False, True]
    result = recall(report | {"pins": [[2, 1]]}, 2, layer=0)
    assert shares(result) == {(0, 0): round(1 / 2.5, 6), (0, 1): round(1.5 / 2.5, 6)}
    assert result.pinned == [1]  # the pinned shot is listed apart; its frames were never routed to


def test_recorder_read_back_deferred_to_one_flush_equals_recording_each_call():
    """On a GPU the recorder keeps each call's statistics on the device and reads them back in one
    copy per forward (`flush`). Deferred (here on the CPU, defer=True) over two steps of two layers,
    dense and MoC calls mixed, every statistic equals recording each call at once; and nothing is
    added up until something reads (last_density, totals, shot_routing)."""
    layout = TokenLayout(frame_tokens=3, shot_frames=(2, 3, 2))
    config = MoCConfig(top_k=2)
    g = torch.Generator().manual_seed(5)
    calls = []
    for step in range(2):
        for layer in range(2):
            q, k = (torch.randn(2, 3, layout.num_tokens, 8, generator=g) for _ in range(2))
            calls.append((step, layer, None if (step, layer) == (1, 0) else route(q, k, layout, config)))
    recorders = []
    for defer in (False, True):
        rec = RoutingRecorder(layout, [0, 1, 2], 0, num_layers=2, num_heads=3, steps=2)
        rec.defer = defer
        for step, layer, selection in calls:
            if layer == 0:
                rec.begin_step(step)
            if selection is None:
                rec.record_dense(layer, (2, 3, layout.num_tokens, 8), layout.num_tokens, 0)
            else:
                rec.record(layer, selection, head_dim=8)
        recorders.append(rec)
    now, later = recorders
    assert later._pending and not now._pending and not later.att_n[1].any()  # nothing added up yet
    assert later.last_density == now.last_density and not later._pending
    assert later.total_flops_moc == pytest.approx(now.total_flops_moc) and later.backends == now.backends
    for shot in range(3):
        a, b = now.shot_routing(shot), later.shot_routing(shot)
        for name in ("frame_selection", "density", "recall", "routed_frames"):
            np.testing.assert_allclose(getattr(b, name), getattr(a, name), err_msg=name)
        assert b.flops_moc == pytest.approx(a.flops_moc) and b.flops_dense == a.flops_dense


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the recorder defers its reads there)")
def test_recorder_on_a_gpu_reads_back_once_and_equals_the_cpu():
    """On CUDA a call's statistics stay on the device until read; they equal the CPU's."""
    layout = TokenLayout(frame_tokens=5, shot_frames=(3, 2, 3))
    config = MoCConfig(top_k=2)
    g = torch.Generator().manual_seed(9)
    recs = {d: RoutingRecorder(layout, [0, 1, 2], 0, num_layers=3, num_heads=2, steps=1) for d in ("cpu", "cuda")}
    for rec in recs.values():
        rec.begin_step(0)
    for layer in range(3):
        q, k = (torch.randn(1, 2, layout.num_tokens, 16, generator=g) for _ in range(2))
        for device, rec in recs.items():
            rec.record(layer, route(q.to(device), k.to(device), layout, config, impl="reference"), head_dim=16)
    assert len(recs["cuda"]._pending) == 3 and not recs["cpu"]._pending
    a, b = recs["cpu"].shot_routing(2), recs["cuda"].shot_routing(2)
    for name in ("frame_selection", "density", "recall", "routed_frames"):
        np.testing.assert_allclose(getattr(b, name), getattr(a, name), err_msg=name)


def test_video_frames_of_a_latent_frame_and_thumbnails():
    assert list(video_frames_of_latent(0, 4)) == [0] and list(video_frames_of_latent(2, 4)) == [5, 6, 7, 8]
    assert list(video_frames_of_latent(3, 1)) == [3] and middle_video_frame(3, 1) == 3
    assert middle_video_frame(2, 4) == 7 and middle_video_frame(0, 4) == 0  # the middle of 5..8 (index 2 of 4)
    image = torch.zeros(4, 8, 3, dtype=torch.uint8)
    image[:, 4:] = 200  # right half bright: area-averaged down, it stays on the right
    small = thumbnail(image, width=4)
    assert small.shape == (2, 4, 3) and small[0, 0, 0] == 0 and small[0, 3, 0] == 200
    assert thumbnail(image, width=16).shape == (8, 16, 3)
    result = with_thumbnails(recall(hand_report(), 2), lambda shot, frames: None if shot == 1 else
                             torch.stack([image] * len(frames)), width=4)
    assert [f.thumbnail is None for f in result.frames] == [True, False, False]  # shot 1's take is gone


@pytest.mark.parametrize("mode", ["joint", "shot_by_shot"])
def test_a_real_render_recalls_earlier_shots_with_pictures(make_engine, mode):
    engine = make_engine()
    story = tiny_story(mode)
    result = engine.render(story)
    report = result.routing
    assert report["routed_shots"] == [True, True, True]
    assert report["keys"] == [r.key for r in result.shots]
    for shot in (1, 2):
        got = recall(report, shot)
        assert got.frames and sum(f.share for f in got.frames) == pytest.approx(1.0)
        assert all(f.shot < shot for f in got.frames), got.frames  # causal: earlier shots only
        # top_k = 2 and shot 1 has 3 earlier frames: every query routes 2 picks into earlier shots
        assert got.routed_picks == pytest.approx(2.0, abs=1e-3)
    assert recall(report, 0).frames == []  # the first shot has nothing to recall
    hits = engine.cache.stats().hits
    pictured = with_thumbnails(recall(report, 2, layer=1, frame=0),
                               lambda s, frames: engine.take_pictures(report["keys"][s], frames), width=40)
    assert engine.cache.stats().hits == hits  # looking is not reusing
    assert pictured.frames
    for f in pictured.frames:
        assert f.thumbnail.shape == (24, 40, 3) and f.thumbnail.dtype == np.uint8  # 48x80 frames at width 40
        source = result.shots[f.shot]
        full = engine.cache.read(source.key).frames[f.frame]  # the pixel codec: latent frame k = video frame k
        np.testing.assert_array_equal(f.thumbnail, thumbnail(full, width=40))
    assert engine.take_pictures(report["keys"][0], [0, 2, 99]).shape == (3, 48, 80, 3)  # clamped to the take
    # the current takes read back without rendering give the same report
    again = engine.current_routing(story)
    assert again["keys"] == report["keys"]
    np.testing.assert_allclose(again["frame_routed"], report["frame_routed"])
