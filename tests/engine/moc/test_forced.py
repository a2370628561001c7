"""The forced links as dense groups (forced.py, step 1 of backend "gather" with forced="sdpa"), on
the CPU without Triton: the groups against a token-by-token statement of the forced rule, the
grouped SDPA against the float32 reference (values and log-sum-exp), its backward from a larger
attention's merged statistics against autograd, and when planning declines."""

import dataclasses
import math

import pytest
import torch

from engine.moc import MoCConfig, TokenLayout, forced_links, route
from engine.moc.attention import reference_attention
from engine.moc.forced import (
    FALLBACK_REASONS,
    forced_groups,
    sdpa_forced_attention,
    sdpa_forced_backward,
    sdpa_forced_plan,
)
from engine.moc.triton_gather import forced_only

from .conftest import random_layout

TEXT = TokenLayout(frame_tokens=13, shot_frames=(2, 3, 1), text_tokens=(5, 3, 4, 2), text_shots=(-1, 0, 1, 2))
# (name, layout, config, q_offset): the shot anchor with captions, a pinned shot, a context offset
# inside a chunk, per-chunk anchors (one group per chunk), frames cut into sub-chunks
CASES = [
    ("text", TEXT, MoCConfig(top_k=2), 0),
    ("pins", TEXT, MoCConfig(top_k=2, pins=((2, 0),)), 0),
    ("q_offset", TokenLayout(frame_tokens=11, shot_frames=(2, 3, 2)), MoCConfig(top_k=2), 2 * 11 + 4),
    ("text_q_offset", TEXT, MoCConfig(top_k=2), 3),
    ("chunk_anchor", TEXT, MoCConfig(top_k=2, anchor="chunk"), 0),
    ("window_no_text_anchor", TEXT, MoCConfig(top_k=2, anchor="window", text_anchor=False), 0),
    ("subframe", TokenLayout(frame_tokens=17, shot_frames=(2, 2), chunking="subframe", chunk_size=6),
     MoCConfig(top_k=2), 0),
]
CASE_IDS = [name for name, *_ in CASES]


def random_qkv(layout, B, H, D, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, layout.num_tokens, D, generator=g).to(dtype) for _ in range(3)]


def forced_keys_by_token(layout: TokenLayout, config: MoCConfig, token: int) -> set[int]:
    """The forced rule token by token: the keys whose chunk the token's chunk is forced to."""
    forced = forced_links(layout, config)
    chunk_of = [c for c, (s, e, *_) in enumerate(layout.chunks) for _ in range(s, e)]
    return {j for j in range(layout.num_tokens) if forced[chunk_of[token], chunk_of[j]]}


@pytest.mark.parametrize("name,layout,config,q_offset", CASES, ids=CASE_IDS)
def test_groups_partition_the_queries_with_their_forced_key_sets(name, layout, config, q_offset):
    Nq = layout.num_tokens - q_offset
    q, k, _ = random_qkv(layout, 1, 2, 16, seed=CASE_IDS.index(name))
    sel = route(q[:, :, q_offset:], k, layout, config, q_offset=q_offset, impl="reference")
    groups = forced_groups(sel)
    owner = {}
    for g, group in enumerate(groups):
        keys = {j for a, b in group.keys for j in range(a, b)}
        assert group.num_keys == len(keys)
        for a, b in group.queries:
            for t in range(a, b):
                assert t not in owner, f"query {t} in two groups"
                owner[t] = g
                assert keys == forced_keys_by_token(layout, config, q_offset + t), f"query {t}: wrong key set"
    assert sorted(owner) == list(range(Nq))  # every query row in exactly one group
    key_sets = [group.keys for group in groups]
    assert len(set(key_sets)) == len(key_sets)  # rows with one key set share one group
    if name in ("text", "pins"):
        assert len(groups) == layout.num_shots + 1  # one per shot (frames and caption), one global caption
        assert len(groups[-1].queries) == 2  # a shot's caption and its frames: two query ranges, one group


def test_groups_are_computed_once_per_layout():
    q, k, _ = random_qkv(TEXT, 1, 1, 16, seed=1)
    a = route(q, k, TEXT, MoCConfig(top_k=2), impl="reference")
    b = route(k, q, TEXT, MoCConfig(top_k=3), impl="reference")
    assert forced_groups(a) is forced_groups(b)  # same forced links: the memo's entry
    pinned = route(q, k, TEXT, MoCConfig(top_k=2, pins=((2, 0),)), impl="reference")
    assert forced_groups(pinned) != forced_groups(a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name,layout,config,q_offset", CASES, ids=CASE_IDS)
def test_sdpa_forced_attention_matches_the_reference(name, layout, config, q_offset, dtype):
    """Out and log-sum-exp (log2 units) of the grouped SDPA against the float32 reference on the
    forced links alone; several heads and batches, odd sizes."""
    q, k, v = random_qkv(layout, 2, 3, 32, seed=40 + CASE_IDS.index(name), dtype=dtype)
    q = q[:, :, q_offset:]
    sel = route(q, k, layout, config, q_offset=q_offset, impl="reference")
    groups, why = sdpa_forced_plan(q, sel)
    assert why == "sdpa"
    scale = 0.3
    out, lse = sdpa_forced_attention(q, k, v, groups, scale)
    forced = forced_only(sel)
    ref = reference_attention(q.float(), k.float(), v.float(), forced, scale)
    scores = torch.einsum("bhtd,bhnd->bhtn", q.float(), k.float()) * scale
    allowed = forced.dense_mask()  # (Nq, N), same for every batch and head
    ref_lse = torch.logsumexp(scores.masked_fill(~allowed, float("-inf")), -1) / math.log(2.0)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert float((out.float() - ref).norm() / ref.norm()) < tol
    assert float((lse - ref_lse).abs().max()) < 50 * tol


# the CPU flash kernel's backward in both dtypes here; cuDNN's (bf16, fp16 only) where a GPU is
BACKWARD_CASES = [("cpu", torch.float32), ("cpu", torch.bfloat16)] + (
    [("cuda", torch.bfloat16), ("cuda", torch.float16)] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device,dtype", BACKWARD_CASES, ids=[f"{d}-{t}" for d, t in BACKWARD_CASES])
@pytest.mark.parametrize("name,layout,config,q_offset", CASES, ids=CASE_IDS)
def test_sdpa_forced_backward_is_the_forced_share_of_a_larger_attention(name, layout, config, q_offset, device,
                                                                         dtype):
    """Gather's backward of the forced links: the rows attend their forced keys plus a random
    extra set (as routed chunks add keys), and sdpa_forced_backward, handed that whole attention's
    out and log-sum-exp, must give what autograd gives for it minus the extra keys' share: dQ of
    every row, dK / dV on the forced keys, and zero on keys no group reads."""
    head_dim = 32 if device == "cpu" else 64  # cuDNN: head dims in multiples of 8
    q, k, v = random_qkv(layout, 2, 3, head_dim, seed=70 + CASE_IDS.index(name), dtype=dtype)
    q = q[:, :, q_offset:]
    sel = route(q, k, layout, config, q_offset=q_offset, impl="reference")
    groups, why = sdpa_forced_plan(q, sel)
    assert why == "sdpa"
    scale = 0.3
    forced = forced_only(sel).dense_mask()  # (Nq, N)
    g = torch.Generator().manual_seed(7 + CASE_IDS.index(name))
    extra = (torch.rand(forced.shape, generator=g) < 0.3) & ~forced  # the "routed" keys
    qf, kf, vf = (x.float().clone().requires_grad_() for x in (q, k, v))
    do = torch.randn(qf.shape, generator=g)

    def attention(keys):
        scores = (torch.einsum("bhtd,bhnd->bhtn", qf, kf) * scale).masked_fill(~keys, float("-inf"))
        return torch.softmax(scores, -1) @ vf, scores

    whole, scores = attention(forced | extra)
    lse = (torch.logsumexp(scores, -1) / math.log(2.0)).detach()  # log2 units, as gather keeps it
    # the forced share by autograd: the whole attention's gradients with the extra keys' part
    # removed, i.e. the gradients through P restricted to the forced keys with the whole rows' P
    p = torch.softmax(scores, -1).detach()
    dp = do @ vf.detach().transpose(-1, -2)
    ds = p * (dp - (do * whole.detach()).sum(-1, keepdim=True)) * forced
    want_dq = ds @ kf.detach() * scale
    want_dk = ds.transpose(-1, -2) @ qf.detach() * scale
    want_dv = (p * forced).transpose(-1, -2) @ do
    # the same by autograd on the whole attention, to check the statement above: its dQ is the
    # forced share plus the extra share
    whole.backward(do)
    ds_extra = p * (dp - (do * whole.detach()).sum(-1, keepdim=True)) * extra
    assert torch.allclose(want_dq + ds_extra @ kf.detach() * scale, qf.grad, atol=1e-4)
    out = whole.detach().to(dtype)
    on = [x.to(device) for x in (q, k, v, out, lse, do.to(dtype))]
    dq = torch.full(q.shape, float("nan"), device=device)  # float32, as gather's dQ accumulator
    dk, dv = (torch.full(x.shape, float("nan"), dtype=dtype, device=device) for x in (k, v))
    sdpa_forced_backward(*on[:5], on[5], groups, scale, dq, dk, dv)
    dq, dk, dv = dq.cpu(), dk.cpu(), dv.cpu()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for got, want in ((dq, want_dq), (dk, want_dk), (dv, want_dv)):
        assert torch.isfinite(got).all()
        assert float((got.float() - want).norm() / want.norm()) < tol
    unread = ~forced.any(0)  # keys no query is forced to: exactly zero
    assert (dk[:, :, unread] == 0).all() and (dv[:, :, unread] == 0).all()


def test_plan_declines_and_says_why(monkeypatch):
    from engine.moc import forced
    q, k, _ = random_qkv(TEXT, 1, 2, 16, seed=5)
    sel = route(q, k, TEXT, MoCConfig(top_k=2), impl="reference")
    assert sdpa_forced_plan(q, sel)[1] == "sdpa"
    no_host = dataclasses.replace(sel, forced_host=None)  # forced links known on the GPU only
    assert sdpa_forced_plan(q, no_host) == (None, "host")
    monkeypatch.setattr(forced, "FORCED_SDPA_MAX_GROUPS", TEXT.num_shots)  # one fewer than it has
    assert sdpa_forced_plan(q, sel) == (None, "groups")
    assert sdpa_forced_plan(q.double(), sel)[1] == "shape"
    assert set(FALLBACK_REASONS) >= {"host", "groups", "shape", "requested", "cudnn"}


def test_routing_hands_the_forced_links_to_the_host_copy():
    layout = random_layout(torch.Generator().manual_seed(3), text=True)
    q, k, _ = random_qkv(layout, 1, 2, 16, seed=6)
    sel = route(q, k, layout, MoCConfig(top_k=2), impl="reference")
    assert sel.forced_host is not None and sel.forced_host.device.type == "cpu"
    assert torch.equal(sel.forced_host, sel.forced.cpu())
    assert sel.heads(1, 2).forced_host is sel.forced_host
