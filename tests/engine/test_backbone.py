"""The Wan processors and forward against diffusers' own Wan attention and model."""

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor

from engine.backbone import StoryTransformer, make_cross_plan
from engine.moc import MoCConfig, TokenLayout
from engine.processors import (CrossAttentionPlan, ForwardPlan, MoCSelfAttention, SelfAttentionPlan,
                               ShotCrossAttention)

TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=3, out_channels=3,
            text_dim=10, freq_dim=16, ffn_dim=24, num_layers=2, rope_max_seq_len=64)


def _model(seed=0):
    torch.manual_seed(seed)
    return WanTransformer3DModel(**TINY).eval()


def _rope(model, frames, h, w):
    return model.rope(torch.empty(1, 1, frames, h, w))


@pytest.mark.parametrize("frames, tokens_hw", [(3, (3, 5)), (5, (2, 3))], ids=["F3-15tok", "F5-6tok"])
@pytest.mark.parametrize("chunking", ["frame", "subframe"])
def test_moc_processor_with_all_chunks_equals_diffusers(frames, tokens_hw, chunking):
    torch.manual_seed(0)
    attn = WanAttention(dim=24, heads=2, dim_head=12, processor=WanAttnProcessor()).eval()
    h, w = tokens_hw
    n = frames * h * w
    x = torch.randn(2, n, 24)
    model = _model()
    cos, sin = _rope(model, frames, h * 2, w * 2)
    with torch.no_grad():
        expected = attn(x, None, None, (cos, sin))
        layout = TokenLayout(h * w, (2, frames - 2), chunking=chunking, chunk_size=4)
        proc = MoCSelfAttention(layer=0)
        proc.plan = ForwardPlan(SelfAttentionPlan(layout, 0, MoCConfig(top_k=layout.num_chunks, causal=False),
                                                  backend="reference"), cross_attn=None, rotary=(cos, sin))
        attn.set_processor(proc)
        got = attn(x, None, None, (cos, sin))
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_cross_attention_sees_only_global_and_own_caption():
    torch.manual_seed(0)
    attn = WanAttention(dim=24, heads=2, dim_head=12, cross_attention_dim_head=12).eval()
    proc = ShotCrossAttention()
    attn.set_processor(proc)
    ranges = [(0, 7, 0), (7, 12, 1), (12, 21, 2)]  # odd token counts per shot
    segs = [[torch.randn(n, 24) for n in (3, 4, 2, 5)], [torch.randn(n, 24) for n in (1, 2, 3, 1)]]  # cond, uncond
    text, plan = make_cross_plan(segs, ranges, "cpu")
    proc.plan = ForwardPlan(None, plan)
    x = torch.randn(2, 21, 24)
    with torch.no_grad():
        out = attn(x, text)
        # the specification: an explicit (B, N, L) mask through plain attention
        mask = torch.zeros(2, 21, text.shape[1], dtype=torch.bool)
        lens = [[s.shape[0] for s in b] for b in segs]
        slot = [max(lens[0][j], lens[1][j]) for j in range(4)]
        off = [sum(slot[:j]) for j in range(5)]
        for b in range(2):
            for t0, t1, shot in ranges:
                mask[b, t0:t1, off[0]:off[0] + lens[b][0]] = True
                mask[b, t0:t1, off[1 + shot]:off[1 + shot] + lens[b][1 + shot]] = True
        q = attn.norm_q(attn.to_q(x)).unflatten(2, (2, 12)).transpose(1, 2)
        k = attn.norm_k(attn.to_k(text)).unflatten(2, (2, 12)).transpose(1, 2)
        v = attn.to_v(text).unflatten(2, (2, 12)).transpose(1, 2)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
        ref = attn.to_out[0](ref.transpose(1, 2).flatten(2))
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
        # changing shot 1's caption changes shot 1's tokens only
        segs[0][2] = segs[0][2] + 1.0
        text2, _ = make_cross_plan(segs, ranges, "cpu")
        out2 = attn(x, text2)
    changed = (out2 - out).abs().amax(dim=(0, 2)) > 1e-6  # (N,)
    assert changed[7:12].all() and not changed[:7].any() and not changed[12:].any()


def test_story_forward_matches_diffusers_model_dense():
    """One shot, MoC off: our forward is diffusers' WanTransformer3DModel.forward."""
    model = _model(1)
    x = torch.randn(2, 3, 3, 6, 10)  # (B, C, F, h, w)
    t = torch.tensor([700.0, 300.0])
    text = torch.randn(2, 6, 10)
    with torch.no_grad():
        expected = model(x, t, text, return_dict=False)[0]
        story = StoryTransformer(model)
        layout = TokenLayout(15, (3,))
        cross = CrossAttentionPlan(shot_ranges=((0, 45, 0),), text_index={0: torch.arange(6)})
        plan = ForwardPlan(SelfAttentionPlan(layout, 0, None), cross, rotary=story.rotary(0, 3, 6, 10, "cpu"))
        got = story.forward(x, t, text, plan)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_per_token_timestep_equals_batch_timestep_when_uniform():
    model = _model(2)
    story = StoryTransformer(model)
    x = torch.randn(1, 3, 2, 6, 10)
    text = torch.randn(1, 4, 10)
    layout = TokenLayout(15, (2,))
    cross = CrossAttentionPlan(shot_ranges=((0, 30, 0),), text_index={0: torch.arange(4)})
    plan = ForwardPlan(SelfAttentionPlan(layout, 0, MoCConfig(top_k=1)), cross, rotary=story.rotary(0, 2, 6, 10, "cpu"))
    with torch.no_grad():
        a = story.forward(x, torch.tensor([500.0]), text, plan)
        b = story.forward(x, torch.full((1, 30), 500.0), text, plan)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_processor_without_plan_says_how_to_fix():
    attn = _model(1).blocks[0].attn1
    attn.set_processor(MoCSelfAttention(0))
    dim = attn.to_q.in_features
    with torch.no_grad(), pytest.raises(RuntimeError, match="StoryTransformer.forward"):
        attn(torch.zeros(1, 4, dim))


def test_pre_rope_routing_scores_the_unrotated_keys():
    """descriptor_rope=False: story_attention routes on the q/k it is given for routing, not on
    the rotated ones, and the choice changes the selection."""
    from engine.moc import MoCConfig, TokenLayout, route
    from engine.processors import SelfAttentionPlan, story_attention

    layout = TokenLayout(frame_tokens=7, shot_frames=(3, 4))
    g = torch.Generator().manual_seed(0)
    q, k, v, qr, kr = (torch.randn(1, layout.num_tokens, 2, 16, generator=g) for _ in range(5))

    class Keep:  # records the selection story_attention made
        def record(self, layer, selection, head_dim):
            self.selection = selection

        def add_seconds(self, seconds):
            pass

    recorders = []
    for q_route, k_route in [(qr, kr), (None, None)]:
        rec = Keep()
        plan = SelfAttentionPlan(layout, 0, MoCConfig(top_k=1), backend="reference", recorder=rec)
        story_attention(q, k, v, plan, 0, q_route, k_route)
        recorders.append(rec)
    want = route(qr.transpose(1, 2), kr.transpose(1, 2), layout, MoCConfig(top_k=1))
    assert torch.equal(recorders[0].selection.routed, want.routed)
    assert not torch.equal(recorders[0].selection.routed, recorders[1].selection.routed)


def test_auto_on_a_gpu_sized_short_sequence_runs_dense_and_says_so(monkeypatch):
    """story_attention with backend="auto": when the cost model says dense SDPA is faster, dense
    runs (no routing) and the recorder is told "dense-auto"; an explicit backend still runs MoC."""
    import engine.moc.attention as moc_attention_module
    from engine.moc import MoCConfig, TokenLayout
    from engine.processors import SelfAttentionPlan, story_attention

    layout = TokenLayout(frame_tokens=7, shot_frames=(3, 4))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, layout.num_tokens, 2, 16, generator=g) for _ in range(3))
    monkeypatch.setattr(moc_attention_module, "dense_is_faster", lambda *args: True)

    class Calls:
        def __init__(self):
            self.backends = []

        def record(self, layer, selection, head_dim):
            self.backends.append(selection.info["backend"])

        def record_dense(self, layer, q_shape, num_keys, q_offset, backend="dense"):
            self.backends.append(backend)

        def add_seconds(self, seconds):
            pass

    for backend, want in [("auto", "dense-auto"), ("reference", "reference")]:
        rec = Calls()
        out = story_attention(q, k, v, SelfAttentionPlan(layout, 0, MoCConfig(top_k=1), backend=backend,
                                                         recorder=rec), 0)
        assert rec.backends == [want]
        if backend == "auto":
            dense = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
            torch.testing.assert_close(out, dense.transpose(1, 2))


def test_compiled_blocks_give_the_eager_loss_and_gradients_at_any_story_shape():
    """StoryTransformer.compile_blocks (the trainer's --compile): the same training loss and
    gradients as the eager blocks, on two story shapes with odd sizes (dynamic shapes: the second
    reuses or recompiles the graphs, never the plan of the first), MoC routing in training mode."""
    import copy

    from engine.training import StoryBatch, TrainingConfig, training_loss
    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
               text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads")
    torch.manual_seed(0)
    eager_model = WanTransformer3DModel(**cfg).train()
    compiled_model = copy.deepcopy(eager_model)
    eager, compiled = StoryTransformer(eager_model), StoryTransformer(compiled_model)
    compiled.compile_blocks()
    config = TrainingConfig(moc=MoCConfig(top_k=2, tile=16), backend="reference")
    for stories, shots, frames, seed in ((2, 3, 2, 0), (3, 2, 3, 1)):
        g = torch.Generator().manual_seed(seed)
        latents = torch.randn(stories, 4, shots * frames, 6, 10, generator=g)  # 15 tokens a frame
        text = [[torch.randn(3 + i, 32, generator=g) for i in range(shots + 1)] for _ in range(stories)]
        batch = StoryBatch(latents, (frames,) * shots, text)
        losses = []
        for tr in (eager, compiled):
            tr.model.zero_grad(set_to_none=True)
            loss = training_loss(tr, batch, config, generator=torch.Generator().manual_seed(seed + 7))
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
        for (name, a), b in zip(eager_model.named_parameters(), compiled_model.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert compiled_model.blocks[0]._compiled_call_impl is not None  # it did run compiled
    assert compiled_model.state_dict().keys() == eager_model.state_dict().keys()  # checkpoints unchanged
