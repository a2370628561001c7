"""Routing invariants on random layouts, against the rules of MOC.md §1."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.moc import MoCConfig, TokenLayout, forced_links, route
from engine.moc.routing import candidate_links, chunk_descriptors, expected_density

from .conftest import naive_routing_mask, random_layout


def qk(layout, B=2, H=3, D=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, layout.num_tokens, D, generator=g, dtype=dtype)
    return q, torch.randn(q.shape, generator=g, dtype=dtype)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), top_k=st.integers(1, 6), causal=st.booleans(),
       anchor=st.sampled_from(["shot", "chunk", "window"]), text=st.booleans(),
       chunking=st.sampled_from(["frame", "subframe", "fixed"]))
def test_invariants(seed, top_k, causal, anchor, text, chunking):
    layout = random_layout(torch.Generator().manual_seed(seed), text=text, chunking=chunking)
    config = MoCConfig(top_k=top_k, causal=causal, anchor=anchor, window=1, route_block=7, tile=4)
    q, k = qk(layout, seed=seed)
    sel = route(q, k, layout, config)
    forced = forced_links(layout, config)
    cand = candidate_links(layout, config, forced)
    qchunk = layout.tensors.token_chunk
    mask = sel.token_mask()
    routed = sel.routed.long()
    valid = routed >= 0
    # forced links always present
    assert mask[..., :][forced[qchunk][None, None].expand_as(mask)].all()
    # every routed chunk is a candidate: never forced, never violates causality
    rows = qchunk[None, None, :, None].expand_as(routed)
    assert cand[rows[valid], routed[valid]].all()
    if causal:
        assert (routed[valid] < rows[valid]).all()
    # exactly min(k, candidates) routed chunks, no duplicates
    n_cand = cand.sum(1)[qchunk]  # (N,)
    assert torch.equal(valid.sum(-1), torch.minimum(n_cand, torch.tensor(top_k))[None, None].expand(2, 3, -1))
    srt = routed.sort(-1).values
    assert not ((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any()
    # the chosen ones agree with a token-by-token restatement of the rules
    assert torch.equal(mask, naive_routing_mask(q, k, layout, config))


def test_text_anchor_and_shot_anchor_links():
    layout = TokenLayout(frame_tokens=5, shot_frames=(2, 3), text_tokens=(4, 2, 3), text_shots=(-1, 0, 1))
    forced = forced_links(layout, MoCConfig(anchor="shot", text_anchor=True))
    # chunks: 0 global text, 1 caption shot0, 2 caption shot1, 3-4 shot0 frames, 5-7 shot1 frames
    assert forced[5].tolist() == [True, False, True, False, False, True, True, True]
    assert forced[3].tolist() == [True, True, False, True, True, False, False, False]
    off = forced_links(layout, MoCConfig(anchor="chunk", text_anchor=False))
    assert torch.equal(off, torch.eye(8, dtype=torch.bool))


def test_window_anchor_stays_in_shot():
    layout = TokenLayout(frame_tokens=3, shot_frames=(3, 3))
    forced = forced_links(layout, MoCConfig(anchor="window", window=1))
    assert forced[2].tolist() == [False, True, True, False, False, False]
    assert forced[3].tolist() == [False, False, False, True, True, False]


def test_fewer_candidates_than_k_keeps_what_exists():
    layout = TokenLayout(frame_tokens=4, shot_frames=(1, 1, 1))
    q, k = qk(layout)
    sel = route(q, k, layout, MoCConfig(top_k=5, anchor="chunk"))
    n = (sel.routed >= 0).sum(-1)[0, 0]
    assert n.tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_q_offset_routes_the_same_as_full_queries():
    layout = TokenLayout(frame_tokens=7, shot_frames=(2, 3, 2))
    q, k = qk(layout)
    config = MoCConfig(top_k=2, tile=4)
    full = route(q, k, layout, config)
    s0, s1 = layout.shot_range(1)
    part = route(q[:, :, s0:s1], k, layout, config, q_offset=s0)
    assert torch.equal(part.routed, full.routed[:, :, s0:s1])
    assert torch.equal(part.token_mask(), full.token_mask()[:, :, s0:s1])


def test_descriptors_are_chunk_means():
    layout = TokenLayout(frame_tokens=5, shot_frames=(2, 1), chunking="subframe", chunk_size=2)
    _, k = qk(layout)
    desc = chunk_descriptors(k, layout)
    for c, (s, e, *_) in enumerate(layout.chunks):
        torch.testing.assert_close(desc[:, :, c], k[:, :, s:e].mean(2))


def test_routing_block_size_does_not_change_the_result():
    layout = random_layout(torch.Generator().manual_seed(3))
    q, k = qk(layout)
    a = route(q, k, layout, MoCConfig(top_k=2, route_block=5))
    b = route(q, k, layout, MoCConfig(top_k=2, route_block=10_000))
    assert torch.equal(a.routed, b.routed)


def test_training_is_deterministic_given_a_generator():
    layout = TokenLayout(frame_tokens=6, shot_frames=(3, 4))
    q, k = qk(layout)
    config = MoCConfig(top_k=3, anchor="chunk")
    a = route(q, k, layout, config, training=True, generator=torch.Generator().manual_seed(7))
    b = route(q, k, layout, config, training=True, generator=torch.Generator().manual_seed(7))
    c = route(q, k, layout, config, training=True, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.routed, b.routed)
    assert not torch.equal(a.routed, c.routed)


def test_drop_off_and_drop_in_statistics():
    """Many tokens, k=4, 40 earlier chunks: every query has >= k candidates after the warm-up."""
    layout = TokenLayout(frame_tokens=40, shot_frames=(1,) * 60)
    q, k = qk(layout, B=1, H=2, D=8)
    top_k = 4
    base = route(q, k, layout, MoCConfig(top_k=top_k, anchor="chunk"))
    qchunk = layout.tensors.token_chunk
    late = qchunk >= 20  # queries with plenty of candidates
    for p_max, lam in [(0.5, 0.0), (0.0, 0.6), (0.8, 1.5)]:
        config = MoCConfig(top_k=top_k, anchor="chunk", drop_off=p_max, drop_in=lam)
        sel = route(q, k, layout, config, training=True, generator=torch.Generator().manual_seed(1))
        routed = sel.routed.long()
        kept = torch.zeros_like(routed[..., 0])
        for j in range(top_k):  # how many of the base top-k survived
            kept += (routed == base.routed.long()[..., j:j + 1]).any(-1).long()
        dropped = (top_k - kept)[..., late].double()
        # E[floor(p * k)] for p ~ U(0, p_max)
        grid = torch.linspace(0, p_max, 100_001, dtype=torch.float64)
        expect_drop = torch.floor(grid * top_k).mean()
        assert abs(dropped.mean() - expect_drop) < 0.05 + 0.05 * expect_drop
        added = ((routed >= 0).sum(-1) - kept)[..., late].double()
        expect_add = torch.distributions.Poisson(lam).sample((200_000,)).clamp(max=top_k).mean() if lam else 0.0
        assert abs(added.mean() - expect_add) < 0.05 + 0.05 * float(expect_add)
        # dropped-in chunks still obey causality and never duplicate forced links
        valid = routed >= 0
        rows = qchunk[None, None, :, None].expand_as(routed)
        assert (routed[valid] < rows[valid]).all()


def test_density_matches_dense_mask_and_expectation():
    layout = TokenLayout(frame_tokens=9, shot_frames=(3, 3, 3))
    q, k = qk(layout)
    config = MoCConfig(top_k=2)
    sel = route(q, k, layout, config)
    mask_density = float(torch.stack([sel.dense_mask(b, h).float().mean() for b in range(2) for h in range(3)]).mean())
    assert sel.density() == pytest.approx(mask_density)
    assert sel.density() == pytest.approx(expected_density(layout, config))  # equal chunk sizes
    per_head = sel.density_per_head()
    assert per_head.shape == (3,) and float(per_head.mean()) == pytest.approx(sel.density())


def test_tile_union_covers_every_token_and_flags_full_chunks():
    layout = random_layout(torch.Generator().manual_seed(11), text=True)
    q, k = qk(layout)
    sel = route(q, k, layout, MoCConfig(top_k=2, tile=8))
    mask = sel.token_mask()  # (B, H, N, C)
    B, H, N, C = mask.shape
    for t in range(sel.tile_count.shape[-1]):
        rows = mask[:, :, t * 8:(t + 1) * 8]
        union = rows.any(2)
        full = rows.all(2)
        ids = sel.tile_chunks[:, :, t].long()
        got_union = torch.zeros(B, H, C + 1, dtype=torch.bool).scatter_(-1, torch.where(ids >= 0, ids, C), True)[..., :C]
        got_full = torch.zeros(B, H, C + 1, dtype=torch.bool).scatter_(
            -1, torch.where(ids >= 0, ids, C), sel.tile_full[:, :, t])[..., :C]
        assert torch.equal(got_union, union) and torch.equal(got_full, full)
        assert torch.equal(sel.tile_count[:, :, t], union.sum(-1).int())


def test_chunk_counts_are_routed_selections_per_query_chunk():
    layout = TokenLayout(frame_tokens=4, shot_frames=(2, 2))
    q, k = qk(layout)
    sel = route(q, k, layout, MoCConfig(top_k=1))
    counts = sel.chunk_counts()
    assert counts.shape == (3, 4, 4)
    assert counts[:, :2].sum() == 0  # shot 0 has no earlier chunks to route to
    assert int(counts.sum()) == 2 * 3 * 8  # 8 tokens of shot 1, one routed chunk each, 2 batches
    stats = sel.stats()
    assert stats.routed_chunks_per_tile <= stats.union_chunks_per_tile


@pytest.mark.parametrize("kwargs, field", [
    (dict(top_k=0), "top_k"), (dict(top_k=-3), "top_k"), (dict(anchor="frame"), "anchor"),
    (dict(window=-1), "window"), (dict(drop_off=1.5), "drop_off"), (dict(drop_in=-1.0), "drop_in"),
    (dict(tile=100), "tile"),
])
def test_bad_config_names_the_argument(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MoCConfig(**kwargs)


@pytest.mark.parametrize("kwargs, field", [
    (dict(frame_tokens=0, shot_frames=(1,)), "frame_tokens"),
    (dict(frame_tokens=4, shot_frames=()), "shot_frames"),
    (dict(frame_tokens=4, shot_frames=(2, 0)), r"shot_frames\[1\]"),
    (dict(frame_tokens=4, shot_frames=(2,), chunking="subframe", chunk_size=0), "chunk_size"),
    (dict(frame_tokens=4, shot_frames=(2,), chunking="blocks"), "chunking"),
    (dict(frame_tokens=4, shot_frames=(2,), text_tokens=(3,)), "text_shots"),
    (dict(frame_tokens=4, shot_frames=(2,), text_tokens=(3,), text_shots=(5,)), r"text_shots\[0\]"),
])
def test_bad_layout_names_the_argument(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TokenLayout(**kwargs)


def test_mismatched_shapes_are_clear_errors():
    layout = TokenLayout(frame_tokens=4, shot_frames=(2,))
    q, k = qk(layout)
    with pytest.raises(ValueError, match="k has 7 tokens"):
        route(q, k[:, :, :7], layout, MoCConfig())
    with pytest.raises(ValueError, match="agree in B, H and D"):
        route(q[:, :2], k, layout, MoCConfig())
    with pytest.raises(ValueError, match="q_offset"):
        route(q[:, :, :4], k, layout, MoCConfig(), q_offset=5)
    with pytest.raises(ValueError, match=r"\(B, H, N, D\)"):
        route(q[0], k, layout, MoCConfig())


def test_demo_recalls_returning_frames():
    """In the demo's story, frame j of shot 2 is frame j of shot 0 returning: routing must find it."""
    from engine.moc.demo import routing_demo
    lines = routing_demo(seed=1).splitlines()
    for j in range(3):
        line = next(l for l in lines if l.startswith(f"shot 2 frame {j}:"))
        assert line.split(": ")[1].startswith(f"s0f{j} ")


def test_layout_derived_links_are_made_once_per_layout_and_config():
    from engine.moc.routing import links_on
    layout = TokenLayout(frame_tokens=4, shot_frames=(2, 2, 3))
    forced, cand = links_on(layout, MoCConfig(), "cpu")
    again = links_on(layout, MoCConfig(), "cpu")
    assert again[0] is forced and again[1] is cand  # cached: no per-layer rebuild (or host copy on a GPU)
    assert torch.equal(forced, forced_links(layout, MoCConfig()))
    assert torch.equal(cand, candidate_links(layout, MoCConfig(), forced))
    pinned, pinned_cand = links_on(layout, MoCConfig(pins=((2, 0),)), "cpu")  # another config: its own entry
    assert pinned.sum() > forced.sum() and not torch.equal(pinned_cand, cand)
    fresh = TokenLayout(frame_tokens=4, shot_frames=(2, 2, 3))
    assert links_on(fresh, MoCConfig(), "cpu")[0] is not forced  # per layout object, freed with it
    assert layout.tensors_on("cpu") is layout.tensors
