"""Memory pins and blocks in the routing rules and every CPU backend: a pinned shot is always
attended (whatever the scores, in training too), a blocked shot never, checked on the selection
and on the attention values themselves (perturbing a blocked shot's values changes nothing)."""

import pytest
import torch

from engine.moc import MoCConfig, TokenLayout, forced_links, moc_attention, route

LAYOUT = TokenLayout(frame_tokens=13, shot_frames=(2, 3, 2, 3), text_tokens=(5, 3, 4, 3, 4),
                     text_shots=(-1, 0, 1, 2, 3))
PINS, BLOCKS = ((3, 0),), ((3, 1), (2, 0))


def qkv(seed: int, B=2, H=3, D=8, shun_shot0=True):
    g = torch.Generator().manual_seed(seed)
    N = LAYOUT.num_tokens
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    if shun_shot0:  # shot 0's keys point away from every query: routing alone would never pick them
        shot0 = LAYOUT.tensors.chunk_shot[LAYOUT.tensors.token_chunk] == 0
        k[:, :, shot0] = -q.mean(2, keepdim=True).expand(-1, -1, int(shot0.sum()), -1) * 5
    return q, k, v


def shot_of_tokens():
    lt = LAYOUT.tensors
    return lt.chunk_shot[lt.token_chunk]


def chunk_sets(selection):
    """(B, H, N, C) attended chunks, the chunk shots and the query tokens' shots."""
    return selection.token_mask(), LAYOUT.tensors.chunk_shot, shot_of_tokens()


@pytest.mark.parametrize("training", [False, True])
def test_pins_always_blocks_never(training):
    q, k, _ = qkv(0)
    config = MoCConfig(top_k=1, pins=PINS, blocks=BLOCKS)
    gen = torch.Generator().manual_seed(3) if training else None
    mask, cshot, qshot = chunk_sets(route(q, k, LAYOUT, config, training=training, generator=gen, impl="reference"))
    video = ~LAYOUT.tensors.chunk_is_text
    assert mask[:, :, qshot == 3][..., (cshot == 0) & video].all()  # pinned: every frame of shot 0
    assert not mask[:, :, qshot == 3][..., cshot == 1].any()  # blocked: frames and caption of shot 1
    assert not mask[:, :, qshot == 2][..., cshot == 0].any()
    # without the pin, routing on these scores does not pick all of shot 0 for shot 3
    plain, _, _ = chunk_sets(route(q, k, LAYOUT, MoCConfig(top_k=1), impl="reference"))
    assert not plain[:, :, qshot == 3][..., (cshot == 0) & video].all()


def test_pins_are_forced_links_and_config_errors():
    forced = forced_links(LAYOUT, MoCConfig(pins=PINS))
    cs, text = LAYOUT.tensors.chunk_shot, LAYOUT.tensors.chunk_is_text
    assert forced[cs == 3][:, (cs == 0) & ~text].all() and not forced[cs == 2][:, (cs == 0) & ~text].any()
    with pytest.raises(ValueError, match="pinned and blocked"):
        MoCConfig(pins=((2, 1),), blocks=((2, 1),))
    with pytest.raises(ValueError, match="pairs"):
        MoCConfig(pins=((2,),))


@pytest.mark.parametrize("backend", ["reference", "dense", "flex", "auto"])
def test_attention_values_follow_pins_and_blocks(backend):
    q, k, v = qkv(1)
    config = MoCConfig(top_k=1, pins=PINS, blocks=BLOCKS)
    selection = route(q, k, LAYOUT, config, impl="reference")
    qshot = shot_of_tokens()
    try:
        out = moc_attention(q, k, v, selection, backend=backend)
    except (ValueError, RuntimeError, NotImplementedError) as err:
        pytest.skip(f"{backend} is not available on this machine: {err}")
    v_blocked = v.clone()
    v_blocked[:, :, qshot == 1] += 100.0  # shot 3 must not notice: it blocks shot 1
    out_b = moc_attention(q, k, v_blocked, selection, backend=backend)
    assert torch.allclose(out_b[:, :, qshot == 3], out[:, :, qshot == 3], atol=1e-5)
    v_pinned = v.clone()
    v_pinned[:, :, qshot == 0] += 100.0  # shot 3 must notice: it pins shot 0
    out_p = moc_attention(q, k, v_pinned, selection, backend=backend)
    moved = (out_p[:, :, qshot == 3] - out[:, :, qshot == 3]).abs().amax(-1)  # (B, H, tokens of shot 3)
    assert (moved > 1e-3).all()


def test_story_pins_validate_upgrade_and_reach_the_config():
    from engine.story import STORY_VERSION, Shot, Story, StoryError
    v1 = {"version": 1, "global_caption": "g", "shots": [{"caption": "a", "frames": 2}, {"caption": "b", "frames": 2}]}
    story = Story.from_dict(v1)
    assert story.shots[1].pins == [] and story.to_dict()["version"] == STORY_VERSION
    with pytest.raises(StoryError, match="version 2 field"):
        Story.from_dict({**v1, "shots": [v1["shots"][0], {**v1["shots"][1], "pins": [0]}]})
    s = Story("g", [Shot("a", 2), Shot("b", 2), Shot("c", 2, pins=[0], blocks=[1])]).validate()
    assert s.links() == (((2, 0),), ((2, 1),))
    for shots, field in [([Shot("a", 2), Shot("b", 2, pins=[1])], "shots[1].pins"),
                         ([Shot("a", 2), Shot("b", 2, pins=[0, 0])], "shots[1].pins"),
                         ([Shot("a", 2), Shot("b", 2, blocks=["0"])], "shots[1].blocks[0]")]:
        with pytest.raises(StoryError, match=field.replace("[", r"\[").replace("]", r"\]")):
            Story("g", shots).validate()
    dense = Story("g", [Shot("a", 2), Shot("b", 2, pins=[0])])
    dense.settings.moc.enabled = False
    with pytest.raises(StoryError, match="moc.enabled"):
        dense.validate()


def test_open_shots_route_to_later_chunks_only_for_themselves():
    q, k, _ = qkv(2, shun_shot0=False)
    mask, cshot, qshot = chunk_sets(route(q, k, LAYOUT, MoCConfig(top_k=4, open_shots=(1,)), impl="reference"))
    later_video = ~LAYOUT.tensors.chunk_is_text  # captions sit before the video: always earlier
    assert mask[:, :, qshot == 1][..., (cshot >= 2) & later_video].any()  # shot 1 may look ahead
    assert not mask[:, :, qshot == 2][..., (cshot == 3) & later_video].any()  # shot 2 may not
    closed, _, _ = chunk_sets(route(q, k, LAYOUT, MoCConfig(top_k=4), impl="reference"))
    assert not closed[:, :, qshot == 1][..., (cshot >= 2) & later_video].any()


def test_context_cache_hole():
    from engine.context_cache import ContextKV
    kv = ContextKV(1, 1, 10, 1, 2, dtype=torch.float32, device=torch.device("cpu"))
    kv.update(0, 0, torch.ones(1, 10, 1, 2), torch.ones(1, 10, 1, 2), 10)
    kv.mark_context(0, 10)
    with pytest.raises(ValueError, match="context is final"):
        kv.update(0, 3, torch.zeros(1, 2, 1, 2), torch.zeros(1, 2, 1, 2), 10)
    kv.open_hole(3, 6)
    k, _ = kv.update(0, 3, torch.zeros(1, 3, 1, 2), torch.zeros(1, 3, 1, 2), 10)
    assert k[0, 0, :, 0].tolist() == [1, 1, 1, 0, 0, 0, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="context is final"):
        kv.update(0, 5, torch.zeros(1, 2, 1, 2), torch.zeros(1, 2, 1, 2), 10)  # past the hole
    kv.close_hole()
    with pytest.raises(ValueError, match="inside the finished context"):
        kv.open_hole(8, 12)


@pytest.mark.parametrize("training", [False, True])
def test_open_shots_with_their_own_top_k_keep_every_causal_pick(training):
    """open_top_k = k' > 0: an open shot keeps the top-k it has without open_shots, slot for slot,
    and routes k' more among the later chunks only, the best by q . mean(K); other shots leave
    those slots empty. In training the drop-off / drop-in then act on all of them (pins and blocks
    still hold)."""
    q, k, _ = qkv(4, shun_shot0=False)
    top_k, extra = 2, 3
    open_config = MoCConfig(top_k=top_k, open_shots=(1,), open_top_k=extra, pins=PINS, blocks=BLOCKS)
    assert open_config.routed_slots == top_k + extra and open_config.max_routed == 2 * top_k + extra
    closed = route(q, k, LAYOUT, MoCConfig(top_k=top_k, pins=PINS, blocks=BLOCKS), impl="reference")
    lt = LAYOUT.tensors
    qshot = shot_of_tokens()
    video = ~lt.chunk_is_text
    open_video = (qshot == 1) & video[lt.token_chunk]  # its caption's queries also look ahead: from chunk 2 on
    if not training:
        got = route(q, k, LAYOUT, open_config, impl="reference")
        assert got.routed.shape[-1] == top_k + extra
        assert torch.equal(got.routed[..., :top_k], closed.routed)  # the causal picks, slot for slot
        later = got.routed[..., top_k:]
        assert (later[:, :, qshot != 1] == -1).all()  # only the open shot has later slots
        picked = later[:, :, open_video].long()
        assert (picked >= 0).all() and (lt.chunk_shot[picked] >= 2).all() and video[picked].all()  # later only
        # they are the best later candidates by score
        desc = torch.stack([k[:, :, s:e].mean(2) for s, e, *_ in LAYOUT.chunks], dim=2)
        scores = torch.einsum("bhtd,bhcd->bhtc", q[:, :, open_video], desc)
        later_cols = (lt.chunk_shot >= 2) & video
        best = scores.masked_fill(~later_cols, float("-inf")).topk(extra, dim=-1).indices
        assert torch.equal(picked.sort(-1).values, best.sort(-1).values)
    else:
        gen = torch.Generator().manual_seed(5)
        got = route(q, k, LAYOUT, open_config, training=True, generator=gen, impl="reference")
        assert got.routed.shape[-1] == open_config.max_routed
        mask = got.token_mask()
        cshot = lt.chunk_shot
        assert mask[:, :, qshot == 3][..., (cshot == 0) & video].all()  # pinned
        assert not mask[:, :, qshot == 3][..., cshot == 1].any()  # blocked
        assert not mask[:, :, qshot == 2][..., (cshot == 3) & video].any()  # a closed shot never looks ahead
    with pytest.raises(ValueError, match="open_top_k"):
        MoCConfig(open_top_k=-1)
