"""Backends against the specification: reference vs a naive masked computation, MoC with
k >= chunks vs dense attention, flex vs reference, gradients, and the dispatch errors."""

import pytest
import torch
import torch.nn.functional as F

from engine.moc import MoCConfig, TokenLayout, moc_attention, route
from engine.moc.attention import reference_attention

from .conftest import random_layout


def qkv(layout, B=2, H=3, D=8, seed=0, dtype=torch.float32, grad=False):
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(B, H, layout.num_tokens, D, generator=g, dtype=dtype) for _ in range(3)]
    return [t.requires_grad_(grad) for t in out]


def naive_masked(q, k, v, mask, scale=None):
    """float64 softmax over an explicit (Nq, N) mask, one (b, h) at a time."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.empty(q.shape, dtype=torch.float64)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            s = (q[b, h].double() @ k[b, h].double().T) * scale
            s[~mask[b, h]] = float("-inf")
            out[b, h] = torch.softmax(s, -1) @ v[b, h].double()
    return out


@pytest.mark.parametrize("seed", range(6))
def test_reference_matches_naive_masked_attention(seed):
    layout = random_layout(torch.Generator().manual_seed(100 + seed), text=seed % 2 == 1,
                           chunking=["frame", "subframe", "fixed"][seed % 3])
    q, k, v = qkv(layout, seed=seed)
    sel = route(q, k, layout, MoCConfig(top_k=2, tile=8))
    mask = torch.stack([torch.stack([sel.dense_mask(b, h) for h in range(3)]) for b in range(2)])
    out = moc_attention(q, k, v, sel, backend="reference")
    torch.testing.assert_close(out.double(), naive_masked(q, k, v, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunking", ["frame", "subframe", "fixed"])
def test_k_at_least_chunks_equals_dense_attention(chunking):
    layout = TokenLayout(frame_tokens=13, shot_frames=(3, 2, 4), chunking=chunking, chunk_size=5)
    q, k, v = qkv(layout)
    sel = route(q, k, layout, MoCConfig(top_k=layout.num_chunks, causal=False, anchor="chunk"))
    assert sel.density() == 1.0
    torch.testing.assert_close(moc_attention(q, k, v, sel, backend="reference"),
                               F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-6)


def test_causal_single_shot_with_large_k_is_dense():
    layout = TokenLayout(frame_tokens=11, shot_frames=(5,))
    q, k, v = qkv(layout)
    sel = route(q, k, layout, MoCConfig(top_k=99))
    torch.testing.assert_close(moc_attention(q, k, v, sel, backend="reference"),
                               F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-6)


def test_gradients_reach_q_k_v_and_match_naive():
    layout = TokenLayout(frame_tokens=7, shot_frames=(2, 3))
    q, k, v = qkv(layout, grad=True)
    sel = route(q, k, layout, MoCConfig(top_k=1))
    out = moc_attention(q, k, v, sel, backend="reference")
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out * w).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    assert all(g.abs().sum() > 0 for g in grads)

    q2, k2, v2 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    mask = torch.stack([torch.stack([sel.dense_mask(b, h) for h in range(3)]) for b in range(2)])
    s = (q2 @ k2.transpose(-1, -2)) * q.shape[-1] ** -0.5
    ref = torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v2
    (ref * w.double()).sum().backward()
    for got, want in zip(grads, (q2.grad, k2.grad, v2.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_flex_matches_reference_on_cpu(seed):
    """Values only: FlexAttention has no CPU backward (gradients are checked on the GPU)."""
    layout = random_layout(torch.Generator().manual_seed(200 + seed), text=seed == 1)
    q, k, v = qkv(layout, seed=seed)
    sel = route(q, k, layout, MoCConfig(top_k=2))
    ref = moc_attention(q, k, v, sel, backend="reference")
    torch.testing.assert_close(moc_attention(q, k, v, sel, backend="flex"), ref, rtol=1e-5, atol=1e-5)


def test_flex_is_not_the_dense_pattern():
    """Guard against a BlockMask that silently admits every key: flex must differ from dense SDPA."""
    layout = TokenLayout(frame_tokens=75, shot_frames=(2, 3))
    q, k, v = qkv(layout, B=1, H=2)
    sel = route(q, k, layout, MoCConfig(top_k=1))
    assert sel.density() < 0.7
    got = moc_attention(q, k, v, sel, backend="flex")
    assert (got - F.scaled_dot_product_attention(q, k, v)).abs().max() > 1e-2


def test_flex_with_q_offset_and_long_sequence():
    """More than one 128-block, chunk edges off the block grid, queries a sub-range of the keys."""
    layout = TokenLayout(frame_tokens=75, shot_frames=(3, 2))
    q, k, v = qkv(layout, B=1, H=2)
    s0, s1 = layout.shot_range(1)
    sel = route(q[:, :, s0:s1], k, layout, MoCConfig(top_k=1), q_offset=s0)
    ref = moc_attention(q[:, :, s0:s1], k, v, sel, backend="reference")
    torch.testing.assert_close(moc_attention(q[:, :, s0:s1], k, v, sel, backend="flex"), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(moc_attention(q[:, :, s0:s1], k, v, sel, backend="dense"), ref, rtol=1e-5, atol=1e-5)


def test_dispatch_records_backend_and_rejects_unknown_names():
    layout = TokenLayout(frame_tokens=4, shot_frames=(2,))
    q, k, v = qkv(layout)
    sel = route(q, k, layout, MoCConfig())
    out = moc_attention(q, k, v, sel, backend="auto")
    assert sel.stats().backend == "dense"  # CPU tensors, a small mask: exact masked SDPA
    assert sel.info["dispatch"].startswith("auto:")
    torch.testing.assert_close(out, moc_attention(q, k, v, sel, backend="reference"), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="backend must be one of"):
        moc_attention(q, k, v, sel, backend="flash")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend='triton' is unavailable"):
            moc_attention(q, k, v, sel, backend="triton")


def test_cpu_auto_uses_the_chunked_path_at_story_sizes(monkeypatch):
    from engine.moc import attention
    layout = TokenLayout(frame_tokens=9, shot_frames=(2, 3))
    q, k, v = qkv(layout)
    sel = route(q, k, layout, MoCConfig(top_k=1))
    monkeypatch.setattr(attention, "CHUNKED_MIN_PAIRS", 10)
    out = moc_attention(q, k, v, sel, backend="auto")
    assert sel.info["backend"] == "chunked" and "density" in sel.info["dispatch"]
    torch.testing.assert_close(out, moc_attention(q, k, v, sel, backend="reference"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(8))
def test_chunked_matches_reference_values_and_gradients(seed):
    """Random layouts (odd sizes, captions, sub-frame chunks), queries a sub-range of the keys,
    pins and blocks, training-mode routing (drop-off / drop-in, empty slots): the chunked path's
    values (no-grad: the CPU flash kernel) and gradients (plain ops) against the reference."""
    from engine.moc.chunked import chunked_moc_attention
    gen = torch.Generator().manual_seed(100 + seed)
    layout = random_layout(gen, text=seed % 2 == 1, chunking=("frame", "subframe", "fixed")[seed % 3])
    S = layout.num_shots
    pins = ((S - 1, 0),) if S > 1 and seed % 4 == 0 else ()
    blocks = ((S - 1, 0),) if S > 2 and seed % 4 == 1 else ()
    config = MoCConfig(top_k=1 + seed % 3, pins=pins, blocks=blocks)
    B, H, D = 2, 3, 8
    q, k, v = (torch.randn(B, H, layout.num_tokens, D, generator=gen) for _ in range(3))
    s0 = layout.shot_range(S - 1)[0] if seed % 2 == 0 else 0
    qs = q[:, :, s0:].clone()
    sel = route(qs, k, layout, config, q_offset=s0, training=seed >= 4, generator=gen)
    with torch.no_grad():
        fast = chunked_moc_attention(qs, k, v, sel)
    torch.testing.assert_close(fast, reference_attention(qs, k, v, sel), rtol=1e-5, atol=1e-5)
    grads = []
    for fn in (chunked_moc_attention, reference_attention):
        a, b, c = (t.clone().requires_grad_() for t in (qs, k, v))
        out = fn(a, b, c, sel)
        out.backward(torch.cos(out.detach() * 3))  # a non-uniform upstream gradient
        grads.append((out.detach(), a.grad, b.grad, c.grad))
    for x, y in zip(*grads):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_chunked_is_not_the_dense_pattern():
    """A sparse selection computes something else than full attention (the check has teeth)."""
    from engine.moc.chunked import chunked_moc_attention
    layout = TokenLayout(frame_tokens=6, shot_frames=(3, 3, 2))
    q, k, v = qkv(layout)
    sel = route(q, k, layout, MoCConfig(top_k=1))
    assert sel.density() < 0.8
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert (chunked_moc_attention(q, k, v, sel) - full).abs().max() > 1e-2


def test_dense_is_faster_only_for_short_sequences_on_a_gpu():
    """The pre-routing cost model: dense wins at a few thousand tokens, MoC from 16k on (gather,
    measured faster than cuDNN there), at MoC-180k too; the CPU never trades MoC for dense."""
    from engine.moc import dense_is_faster
    from engine.moc.attention import GATHER_MIN_KEYS
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert dense_is_faster(1, 12, 8_160, 8_160, 128, 0.16, cuda)
    assert dense_is_faster(1, 12, 6_144, 6_144, 128, 0.3, cuda)  # a training story's size
    assert GATHER_MIN_KEYS <= 16_320 and not dense_is_faster(1, 12, 16_320, 16_320, 128, 0.16, cuda)
    assert not dense_is_faster(1, 12, 65_280, 65_280, 128, 0.16, cuda)
    assert not dense_is_faster(1, 12, 180_000, 180_000, 128, 0.16, cuda)
    assert dense_is_faster(1, 12, 180_000, 180_000, 128, 0.9, cuda)  # nearly dense: no point routing
    assert not dense_is_faster(1, 12, 1_000, 1_000, 128, 0.16, cpu)


def test_mismatched_qkv_shapes_are_clear_errors():
    layout = TokenLayout(frame_tokens=4, shot_frames=(2,))
    q, k, v = qkv(layout)
    sel = route(q, k, layout, MoCConfig())
    with pytest.raises(ValueError, match="q must be"):
        moc_attention(q[:, :, :5], k, v, sel)
    with pytest.raises(ValueError, match="k and v must both be"):
        moc_attention(q, k, v[:, :, :5], sel)
    with pytest.raises(ValueError, match=r"\(B, H, N, D\)"):
        moc_attention(q, k, v[0], sel)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("seed", range(3))
def test_flex_matches_reference_on_gpu(seed):
    layout = TokenLayout(frame_tokens=301, shot_frames=(3, 4, 2), text_tokens=(17, 9, 11, 5), text_shots=(-1, 0, 1, 2))
    q, k, v = [t.cuda().to(torch.bfloat16).requires_grad_() for t in qkv(layout, H=4, D=64, seed=seed)]
    sel = route(q, k, layout, MoCConfig(top_k=3))
    ref = moc_attention(q.float(), k.float(), v.float(), sel, backend="reference")
    got = moc_attention(q, k, v, sel, backend="flex")
    assert (got.float() - ref).norm() / ref.norm() < 1e-2
    w = torch.randn_like(ref)
    g_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
    g_got = torch.autograd.grad((got.float() * w).sum(), (q, k, v))
    for a, b in zip(g_got, g_ref):
        assert (a.float() - b.float()).norm() / b.float().norm() < 2e-2


def test_attend_routes_then_attends_like_the_two_calls():
    layout = TokenLayout(frame_tokens=9, shot_frames=(2, 3))
    q, k, v = qkv(layout)
    s0, s1 = layout.shot_range(1)
    from engine.moc import attend
    out, sel = attend(q[:, :, s0:s1], k, v, layout, MoCConfig(top_k=1), backend="reference", q_offset=s0)
    want = route(q[:, :, s0:s1], k, layout, MoCConfig(top_k=1), q_offset=s0)
    assert torch.equal(sel.routed, want.routed)
    torch.testing.assert_close(out, moc_attention(q[:, :, s0:s1], k, v, want, backend="reference"))


def test_graphed_attention_says_it_needs_cuda():
    from engine.moc.graphed import GraphedAttention
    layout = TokenLayout(frame_tokens=8, shot_frames=(2, 2))
    with pytest.raises(ValueError, match="needs a CUDA device.*engine.moc.attend"):
        GraphedAttention(layout, MoCConfig(top_k=1), (1, 1, 32, 16), (1, 1, 32, 16), torch.float32, "cpu")


def test_a_graph_that_cannot_be_captured_warns_once_and_the_call_runs_eagerly(monkeypatch):
    """graphed_attend returns None where capturing fails (here: no CUDA), says why once, and
    remembers it for the shape; attend on the CPU never tries (auto runs its CPU backend)."""
    import engine.moc.attention as am
    monkeypatch.setattr(am, "_graphs", am.collections.OrderedDict())
    layout = TokenLayout(frame_tokens=8, shot_frames=(2, 2))
    q = k = v = torch.randn(1, 1, 32, 16)
    with pytest.warns(UserWarning, match="could not be captured in a CUDA graph.*ValueError"):
        assert am.graphed_attend(q, k, v, layout, MoCConfig(top_k=1), 0) is None
    assert list(am._graphs.values()) == [None]
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remembered: no second capture, no second warning
        assert am.graphed_attend(q, k, v, layout, MoCConfig(top_k=1), 0) is None
        with torch.no_grad():
            _, sel = am.attend(q, k, v, layout, MoCConfig(top_k=1))
    assert not sel.info.get("graph") and len(am._graphs) == 1
