"""The training step: per-shot noise levels, MoC in training mode, gradients reach Q/K/V."""

import pytest
import torch

from engine.training import StoryBatch, TrainingConfig, draw_shot_sigmas, step_layout, training_loss


def _batch(tiny_model, g, B=2, frames=(3, 2)):
    latents = torch.randn(B, 3, sum(frames), 6, 10, generator=g)
    captions = [["shapes", "a red square", "a blue circle"], ["night", "a green diamond", "it bounces"]][:B]
    return StoryBatch(latents, frames, [tiny_model.text_encoder.encode(c) for c in captions])


def test_training_loss_backpropagates(tiny_model):
    tr = tiny_model.transformer
    tr.model.requires_grad_(True)
    try:
        g = torch.Generator().manual_seed(0)
        loss = training_loss(tiny_model, _batch(tiny_model, g), TrainingConfig(), generator=g)
        loss.backward()
        assert torch.isfinite(loss)
        attn = tr.model.blocks[0].attn1
        for proj in (attn.to_q, attn.to_k, attn.to_v):
            assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    finally:
        tr.model.requires_grad_(False)
        tr.model.zero_grad(set_to_none=True)


def test_training_loss_is_deterministic_given_a_generator(tiny_model):
    losses = [training_loss(tiny_model, _batch(tiny_model, torch.Generator().manual_seed(1)), TrainingConfig(),
                            generator=torch.Generator().manual_seed(7)).item() for _ in range(2)]
    assert losses[0] == losses[1]
    other = training_loss(tiny_model, _batch(tiny_model, torch.Generator().manual_seed(1)), TrainingConfig(),
                          generator=torch.Generator().manual_seed(8)).item()
    assert other != losses[0]


def test_steps_of_one_story_shape_share_a_layout_and_its_device_copies(tiny_model):
    """The layout's memo (links, tensors on the device) outlives a step: later steps of the same
    shape copy nothing to the device again; another shape gets its own layout."""
    config = TrainingConfig()
    tokens = tiny_model.transformer.frame_tokens(6, 10)
    step_layout.cache_clear()
    training_loss(tiny_model, _batch(tiny_model, torch.Generator().manual_seed(1)), config,
                  generator=torch.Generator().manual_seed(2))
    layout = step_layout(tokens, (3, 2), config.chunking, config.chunk_size)
    memo = dict(layout.__dict__["_memo"])
    assert any(key[0] == "links" for key in memo)  # routing memoised its links on this layout
    training_loss(tiny_model, _batch(tiny_model, torch.Generator().manual_seed(3)), config,
                  generator=torch.Generator().manual_seed(4))
    assert step_layout(tokens, (3, 2), config.chunking, config.chunk_size) is layout
    assert all(layout.__dict__["_memo"][key] is value for key, value in memo.items())  # nothing made again
    assert step_layout.cache_info().hits >= 2 and step_layout.cache_info().currsize == 1
    assert step_layout(tokens, (2, 3), config.chunking, config.chunk_size) is not layout


def test_shot_sigmas_follow_the_shifted_schedule():
    sig = draw_shot_sigmas(4000, 3, TrainingConfig(shift=3.0, shared_sigma=0.5), torch.Generator().manual_seed(0))
    assert sig.min() > 0 and sig.max() < 1
    shared = (sig[:, 0] == sig[:, 1]) & (sig[:, 1] == sig[:, 2])
    assert 0.45 < shared.float().mean() < 0.55
    assert 0.6 < sig.median() < 0.8  # shift 3 spends more of the schedule at high noise (median 0.75)


def test_bad_batches_are_named(tiny_model):
    g = torch.Generator().manual_seed(0)
    batch = _batch(tiny_model, g)
    with pytest.raises(ValueError, match="shot_frames"):
        training_loss(tiny_model, StoryBatch(batch.latents, (3, 3), batch.text), TrainingConfig())
    with pytest.raises(ValueError, match="global caption"):
        training_loss(tiny_model, StoryBatch(batch.latents, batch.shot_frames, batch.text[:1]), TrainingConfig())


def test_loss_weights_select_the_cells_that_count(tiny_model):
    """Uniform weights give the plain mean; weight on one cell alone gives that cell's error,
    which differs from the mean; a wrong shape is named."""
    g = torch.Generator().manual_seed(2)
    batch = _batch(tiny_model, g)
    B, C, F, h, w = batch.latents.shape
    cfg = TrainingConfig()
    plain = training_loss(tiny_model, batch, cfg, generator=torch.Generator().manual_seed(3))
    ones = StoryBatch(batch.latents, batch.shot_frames, batch.text, torch.full((B, F, h, w), 2.5))
    assert torch.allclose(training_loss(tiny_model, ones, cfg, generator=torch.Generator().manual_seed(3)), plain)
    spot = torch.zeros(B, F, h, w)
    spot[1, 2, 3, 4] = 1.0
    one = training_loss(tiny_model, StoryBatch(batch.latents, batch.shot_frames, batch.text, spot), cfg,
                        generator=torch.Generator().manual_seed(3))
    assert torch.isfinite(one) and not torch.allclose(one, plain)
    with pytest.raises(ValueError, match="weights must be"):
        training_loss(tiny_model, StoryBatch(batch.latents, batch.shot_frames, batch.text, spot[:, :2]), cfg)


def _look(B, frames, rows, cols, g):
    shape = torch.randint(0, 5, (B, sum(frames), rows, cols), generator=g)
    colour = torch.rand(B, sum(frames), rows, cols, 3, generator=g) * (shape > 0)[..., None]
    return shape, colour


def test_the_look_probe_adds_its_loss(tiny_model):
    """With look_weight the loss is the flow loss (same draws) plus weight x the probe's loss, and
    the probe's head learns from it; bad probe inputs are named."""
    from engine.training import LookProbe
    tr = tiny_model.transformer
    dim = tr.num_heads * tr.head_dim
    layers = tr.num_layers
    probe = LookProbe(dim, layer=0)
    base = _batch(tiny_model, torch.Generator().manual_seed(3))
    batch = StoryBatch(base.latents, base.shot_frames, base.text, look=_look(2, (3, 2), 3, 5, torch.Generator().manual_seed(4)))
    plain = training_loss(tiny_model, batch, TrainingConfig(), generator=torch.Generator().manual_seed(5))
    tr.model.requires_grad_(True)
    try:
        both = training_loss(tiny_model, batch, TrainingConfig(look_weight=0.5), generator=torch.Generator().manual_seed(5),
                             look_probe=probe)
        ce, mse = probe.last
        assert float(both.detach()) == pytest.approx(float(plain) + 0.5 * float(ce + mse), rel=1e-5)
        assert float(ce) > 0 and float(mse) > 0
        tr.model.zero_grad(set_to_none=True)
        both.backward()
        assert probe.head.weight.grad.abs().sum() > 0  # only the probe's loss reaches its head
    finally:
        tr.model.requires_grad_(False)
        tr.model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="look"):
        training_loss(tiny_model, base, TrainingConfig(look_weight=1.0), look_probe=probe)
    with pytest.raises(ValueError, match="layer"):
        training_loss(tiny_model, batch, TrainingConfig(look_weight=1.0), look_probe=LookProbe(dim, layer=layers))
    wrong = StoryBatch(base.latents, base.shot_frames, base.text, look=_look(2, (3, 2), 2, 5, torch.Generator()))
    with pytest.raises(ValueError, match="tokens"):
        training_loss(tiny_model, wrong, TrainingConfig(look_weight=1.0), look_probe=probe)


def test_the_probe_gradient_stops_at_its_layer(tiny_model):
    """The probe's loss alone (the flow loss left out) moves nothing above the probed block."""
    from engine.training import LookProbe
    tr = tiny_model.transformer
    if tr.num_layers < 2:
        pytest.skip("needs two blocks")
    probe = LookProbe(tr.num_heads * tr.head_dim, layer=0)
    base = _batch(tiny_model, torch.Generator().manual_seed(6))
    batch = StoryBatch(base.latents, base.shot_frames, base.text, look=_look(2, (3, 2), 3, 5, torch.Generator().manual_seed(7)))
    tr.model.requires_grad_(True)
    try:
        training_loss(tiny_model, batch, TrainingConfig(look_weight=1.0), generator=torch.Generator().manual_seed(8),
                      look_probe=probe)
        hidden_loss = probe.loss  # recompute with gradients through a fresh forward's hidden states
        grads = {}
        hook = tr.model.blocks[0].register_forward_hook(lambda _m, _i, out: grads.__setitem__("x", out))
        try:
            training_loss(tiny_model, batch, TrainingConfig(), generator=torch.Generator().manual_seed(8))
        finally:
            hook.remove()
        hidden_loss(grads["x"], batch.look).backward()
        assert tr.model.blocks[0].attn1.to_q.weight.grad.abs().sum() > 0
        above = tr.model.blocks[1].attn1.to_q.weight.grad
        assert above is None or float(above.abs().sum()) == 0.0
    finally:
        tr.model.requires_grad_(False)
        tr.model.zero_grad(set_to_none=True)


def test_look_labels_name_the_character_each_token_shows():
    """A block mostly covered by a character gets its shape class and colour; an empty block is
    background; where two characters overlap, the one drawn on top wins."""
    from engine.shapestory.render import FrameParams, look_labels
    from engine.shapestory.world import SHAPES
    p = FrameParams(background=torch.zeros(1, 3), pattern_colour=torch.zeros(1, 3), pattern=torch.zeros(1, dtype=torch.long),
                    pattern_scale=torch.ones(1),
                    centre=torch.tensor([[[24.0, 24.0], [40.0, 24.0], [0.0, 0.0]]]),
                    radius=torch.tensor([[20.0, 12.0, 0.0]]),
                    shape=torch.tensor([[SHAPES.index("square"), SHAPES.index("circle"), 0]]),
                    colour=torch.tensor([[[255.0, 0, 0], [0, 0, 255.0], [0, 0, 0]]]))
    shape, colour = look_labels(p, 16, height=64, width=96)
    assert shape.shape == (1, 4, 6) and colour.shape == (1, 4, 6, 3)
    assert int(shape[0, 0, 0]) == 1 + SHAPES.index("square") and colour[0, 0, 0].tolist() == [1.0, 0.0, 0.0]
    assert int(shape[0, 1, 2]) == 1 + SHAPES.index("circle")  # the circle (slot 1) is drawn over the square
    assert torch.allclose(colour[0, 1, 2], torch.tensor([0.0, 0.0, 1.0]))
    assert int(shape[0, 3, 5]) == 0 and colour[0, 3, 5].abs().sum() == 0
    with pytest.raises(ValueError, match="divide"):
        look_labels(p, 10, height=64, width=96)


# ---- the routing probe --------------------------------------------------------------------------

def test_character_ids_tell_looks_apart_and_background_is_zero():
    from engine.training import character_ids
    shape = torch.tensor([[[[0, 1, 1, 2]]]])  # (B, F, rows, cols)
    red, blue = [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]
    colour = torch.tensor([[[[[0, 0, 0], red, blue, red]]]])
    ids = character_ids((shape, colour))
    assert ids.shape == (1, 4) and ids[0, 0] == 0
    assert len({int(i) for i in ids[0, 1:]}) == 3 and (ids[0, 1:] > 0).all()  # shape or colour differ: new id
    again = character_ids((shape, colour + 0.01))  # the same palette colour, slightly off
    assert torch.equal(ids, again)


def test_route_targets_are_the_earlier_frames_outside_the_shot_that_show_the_character():
    """Shots of 2, 1 and 2 frames, 2 tokens a frame (5 chunks). Character 7 shows in frame 0 and in
    shot 2's frames 3 and 4; character 9 only in frame 2. A token of 7 in shot 2 may route to frame
    0 (earlier, another shot), never to its own shot's frames (forced, not routed), and so should
    shot 2's background token (its shot shows 7); character 9's first appearance, and the
    background of shots whose characters were not shown before, have no target."""
    from engine.moc import MoCConfig, TokenLayout
    from engine.training import route_targets
    layout = TokenLayout(frame_tokens=2, shot_frames=(2, 1, 2))
    ids = torch.tensor([[7, 0, 0, 0, 9, 0, 0, 7, 7, 7]])  # frames: [7 0] [0 0] [9 0] [0 7] [7 7]
    positive, allowed = route_targets(ids, layout, MoCConfig(top_k=2))
    assert positive.shape == (1, 10, 5) and allowed.shape == (10, 5)
    for t in (7, 8, 9):  # character 7 in shot 2
        assert positive[0, t].tolist() == [True, False, False, False, False]
    assert not positive[0, 4].any()  # character 9: first appearance
    assert positive[0, 6].tolist() == [True, False, False, False, False]  # shot 2's background: 7's frame
    assert not positive[0, [1, 2, 3, 5]].any()  # background of shots 0 and 1: nothing shown before
    assert not positive[0, 0].any()  # frame 0's own 7: nothing earlier
    two = torch.tensor([[7, 0, 0, 9, 4, 0, 0, 0, 0, 9]])  # frames: [7 0] [0 9] [4 0] [0 0] [0 9]
    positive, _ = route_targets(two, layout, MoCConfig(top_k=2))
    assert positive[0, 7].tolist() == [False, True, False, False, False]  # shot 2 shows 9: frame 1 only
    assert positive[0, 9].tolist() == [False, True, False, False, False]
    assert allowed[8].tolist() == [True, True, True, False, False]  # shot 2 routes among frames 0-2
    with pytest.raises(ValueError, match="tokens"):
        route_targets(ids[:, :8], layout, MoCConfig())


def test_the_routing_probe_moves_the_scores_towards_the_character_frames():
    """Descending the probe's loss on free queries and keys raises the softmax mass of the positive
    chunks (the sign and the masks are right), from near chance to most of it."""
    from engine.moc import MoCConfig, TokenLayout
    from engine.training import RouteProbe
    layout = TokenLayout(frame_tokens=3, shot_frames=(2, 2, 3))
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    ids = torch.where(torch.rand(2, layout.num_tokens, generator=g) < 0.5,
                      torch.randint(1, 4, (2, layout.num_tokens), generator=g), 0)
    q = torch.randn(2, 2, layout.num_tokens, 8, generator=g, requires_grad=True)
    k = torch.randn(2, 2, layout.num_tokens, 8, generator=g, requires_grad=True)
    probe = RouteProbe()
    opt = torch.optim.Adam([q, k], lr=0.05)
    losses = []
    for _ in range(150):
        probe.start(ids, layout, MoCConfig(top_k=2))
        assert probe.targets[2].any()  # some tokens have a target
        probe(0, q, k)
        loss = probe.loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.3 * losses[0]
    assert probe.targets is None and probe.last is not None  # loss() closes the step


def test_the_routing_probe_weighs_background_tokens_as_told():
    """background_weight sets a background token's weight (0: characters only) and leaves the
    characters' at 1 + character_weight; tokens with nothing earlier to recall weigh nothing; the
    loss is the weighted mean of the two groups (background weight 0: the characters' alone)."""
    from engine.moc import MoCConfig, TokenLayout
    from engine.training import RouteProbe
    layout = TokenLayout(frame_tokens=4, shot_frames=(2, 2, 2))
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    ids = torch.where(torch.rand(1, layout.num_tokens, generator=g) < 0.5,
                      torch.randint(1, 3, (1, layout.num_tokens), generator=g), 0)
    ids[0, :4] = 1  # shot 0's first frame shows character 1, so later shots have something to recall
    ids[0, 8:10] = torch.tensor([1, 0])  # shot 1 shows it too, beside a background token
    q, k = (torch.randn(1, 2, layout.num_tokens, 8, generator=g) for _ in range(2))
    losses = {}
    for bg in (1.0, 0.0, 2.5):
        probe = RouteProbe(background_weight=bg)
        probe.start(ids, layout, MoCConfig(top_k=2))
        positive, _, weight = probe.targets
        has = positive.any(-1)
        assert torch.equal(weight[~has], torch.zeros_like(weight[~has]))
        assert torch.all(weight[has & (ids > 0)] == 5.0)
        assert torch.all(weight[has & (ids == 0)] == bg) and (has & (ids == 0)).any()
        probe(0, q, k)
        losses[bg] = float(probe.loss())
    # the loss is a weighted mean: with background weight 0 it is the characters' mean alone, and
    # from that and weight 1 the background's mean follows, which must predict weight 2.5
    has = positive.any(-1)  # the ids and layout are the same for every weight
    wc, wb = 5.0 * float((has & (ids > 0)).sum()), float((has & (ids == 0)).sum())
    background = (losses[1.0] * (wc + wb) - losses[0.0] * wc) / wb
    assert losses[2.5] == pytest.approx((losses[0.0] * wc + 2.5 * wb * background) / (wc + 2.5 * wb), rel=1e-4)
    assert background != pytest.approx(losses[0.0])  # the two groups differ, so the check has teeth
    with pytest.raises(ValueError, match="weights must be >= 0"):
        RouteProbe(background_weight=-0.5)


def test_the_routing_probe_adds_its_loss_in_the_layers_it_names(tiny_model):
    """With route_weight the loss is the flow loss (same draws) plus weight x the probe's loss;
    the probe's loss alone reaches the named block's query and key projections and nothing above
    it; without MoC or look labels it is refused."""
    from engine.backbone import make_cross_plan
    from engine.processors import ForwardPlan, SelfAttentionPlan
    from engine.training import RouteProbe, character_ids
    tr = tiny_model.transformer
    base = _batch(tiny_model, torch.Generator().manual_seed(3))
    shape = torch.zeros(2, 5, 3, 5, dtype=torch.long)
    shape[:, [0, 3, 4], 1, 2] = 2  # one character: shot 0's first frame and both frames of shot 1
    colour = torch.zeros(2, 5, 3, 5, 3)
    colour[:, [0, 3, 4], 1, 2] = torch.tensor([1.0, 0.5, 0.0])
    batch = StoryBatch(base.latents, base.shot_frames, base.text, look=(shape, colour))
    plain = training_loss(tiny_model, batch, TrainingConfig(), generator=torch.Generator().manual_seed(5))
    probe = RouteProbe(layers=(0,))
    both = training_loss(tiny_model, batch, TrainingConfig(route_weight=0.5),
                         generator=torch.Generator().manual_seed(5), route_probe=probe)
    assert float(probe.last) > 0
    assert float(both) == pytest.approx(float(plain) + 0.5 * float(probe.last), rel=1e-5)

    # the probe's loss alone, through a forward that taps block 0 only
    layout = step_layout(tr.frame_tokens(6, 10), (3, 2), "frame", 0)
    probe.start(character_ids(batch.look), layout, TrainingConfig().moc)
    seen = []

    def tap(layer, q, k):
        seen.append(layer)
        probe(layer, q, k)
    text, cross = make_cross_plan(batch.text, [(*layout.shot_range(i), i) for i in range(2)], "cpu")
    plan = ForwardPlan(self_attn=SelfAttentionPlan(layout=layout, q_offset=0, moc=TrainingConfig().moc,
                                                   backend="reference", route_tap=tap),
                       cross_attn=cross, rotary=tr.rotary(0, 5, 6, 10, "cpu"))
    tr.model.requires_grad_(True)
    try:
        tr.forward(batch.latents.float(), torch.full((2, layout.num_tokens), 500.0), text, plan)
        assert seen == list(range(tr.num_layers)) and len(probe.losses) == 1  # every layer taps, one is probed
        probe.loss().backward()
        first, last = tr.model.blocks[0].attn1, tr.model.blocks[-1].attn1
        assert first.to_q.weight.grad.abs().sum() > 0 and first.to_k.weight.grad.abs().sum() > 0
        assert last.to_q.weight.grad is None or last.to_q.weight.grad.abs().sum() == 0
    finally:
        tr.model.requires_grad_(False)
        tr.model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="routing probe"):
        training_loss(tiny_model, base, TrainingConfig(route_weight=1.0), route_probe=RouteProbe())
    with pytest.raises(ValueError, match="routing probe"):
        training_loss(tiny_model, batch, TrainingConfig(moc=None, route_weight=1.0), route_probe=RouteProbe())


def test_a_regeneration_step_opens_its_shot_to_the_later_ones_and_hides_it_from_them():
    """regeneration_step(shot i of S): i may route to later shots, the later shots may not see i,
    every other shot sits at the context noise level; shots without a later one are refused."""
    from engine.moc import MoCConfig
    from engine.training import regeneration_step
    sig = torch.tensor([[0.9, 0.5, 0.3, 0.7], [0.2, 0.8, 0.6, 0.1]])
    moc, out = regeneration_step(MoCConfig(blocks=((3, 0),)), 4, 1, sig, 0.25)
    assert moc.open_shots == (1,)
    assert set(moc.blocks) == {(3, 0), (2, 1), (3, 1)}  # the user's blocks stay
    assert torch.equal(out[:, 1], sig[:, 1])
    assert torch.all(out[:, [0, 2, 3]] == 0.25)
    for bad in (-1, 3, 4):
        with pytest.raises(ValueError, match="open_shot"):
            regeneration_step(MoCConfig(), 4, bad, sig, 0.25)
    with pytest.raises(ValueError, match="MoC"):
        regeneration_step(None, 4, 1, sig, 0.25)


def test_a_regeneration_step_trains_what_a_both_sided_regeneration_computes(tiny_model):
    """With open_shot=0 the loss on shot 0's cells depends on shot 1 (it may route there) and the
    loss on shot 1's cells no longer depends on shot 0 (its context pass never sees the shot being
    regenerated); a joint step is the other way round (causal routing)."""
    base = _batch(tiny_model, torch.Generator().manual_seed(4))
    frames = base.shot_frames  # (3, 2)
    sig = torch.full((2, 2), 0.6)

    def loss(latents, shot, open_shot):
        w = torch.zeros(2, 5, 6, 10)
        w[:, slice(0, 3) if shot == 0 else slice(3, 5)] = 1.0
        batch = StoryBatch(latents, frames, base.text, weights=w)
        return float(training_loss(tiny_model, batch, TrainingConfig(), generator=torch.Generator().manual_seed(9),
                                   shot_sigmas=sig, open_shot=open_shot))
    later = base.latents.clone()
    later[:, :, 3:] += 3.0  # shot 1 changed
    earlier = base.latents.clone()
    earlier[:, :, :3] += 3.0  # shot 0 changed
    # (the tiny random model mixes little across shots: a dependence moves the loss by ~1e-5 of it)
    # shot 0's loss: blind to shot 1 in a joint step, not in a regeneration of shot 0
    assert loss(later, 0, None) == pytest.approx(loss(base.latents, 0, None), rel=1e-7)
    assert abs(loss(later, 0, 0) - loss(base.latents, 0, 0)) > 1e-6 * loss(base.latents, 0, 0)
    # shot 1's loss: sees shot 0 in a joint step, not when shot 0 is the one regenerated
    assert abs(loss(earlier, 1, None) - loss(base.latents, 1, None)) > 1e-6 * loss(base.latents, 1, None)
    assert loss(earlier, 1, 0) == pytest.approx(loss(base.latents, 1, 0), rel=1e-7)
    with pytest.raises(ValueError, match="open_shot"):
        loss(base.latents, 0, 1)  # the last shot has no later one


def test_by_length_trains_long_stories_on_gather_and_short_ones_on_the_tile_kernels(tiny_model, monkeypatch):
    """backend "by-length": each step's self-attention gets "gather" from GATHER_TRAIN_MIN_SHOTS
    shots up and "triton" below; any other backend passes through unchanged."""
    import engine.training as training
    from engine.training import GATHER_TRAIN_MIN_SHOTS, step_backend
    assert step_backend("by-length", GATHER_TRAIN_MIN_SHOTS) == "gather"
    assert step_backend("by-length", GATHER_TRAIN_MIN_SHOTS - 1) == "triton"
    assert step_backend("reference", 8) == "reference" and step_backend("gather", 1) == "gather"
    asked, real = [], training.SelfAttentionPlan

    def plan(**kwargs):  # record the step's backend, run the reference here (no GPU)
        asked.append(kwargs["backend"])
        return real(**{**kwargs, "backend": "reference"})

    monkeypatch.setattr(training, "SelfAttentionPlan", plan)
    config = TrainingConfig(backend="by-length")
    for shots in (GATHER_TRAIN_MIN_SHOTS - 1, GATHER_TRAIN_MIN_SHOTS):
        g = torch.Generator().manual_seed(shots)
        batch = StoryBatch(torch.randn(1, 3, shots, 6, 10, generator=g), (1,) * shots,
                           [tiny_model.text_encoder.encode(["shapes"] + ["a red square"] * shots)])
        assert torch.isfinite(training_loss(tiny_model, batch, config, generator=g))
    assert asked == ["triton", "gather"]
