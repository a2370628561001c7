"""The Triton kernels (attention forward + backward, fused routing) against the float32 reference.

Where they run:
  GPU:  on CUDA, at modest sizes, bf16 and fp16, head dims 64 and 128.
  CPU:  only under the Triton interpreter, at tiny sizes (fp16 and fp32; the 3.6 interpreter
        miscomputes bf16 dots), in its own process, because TRITON_INTERPRET must be set before
        Triton builds its JIT functions (scripts/test.sh does this for the `interpret` marker):
            TRITON_INTERPRET=1 python -m pytest -q -m interpret
        In a plain CPU run these tests skip.
Every case draws fresh random inputs; layouts have odd sizes and chunk edges off the tile grid.
"""

import os
from dataclasses import replace

import pytest
import torch

from engine.moc import MoCConfig, TokenLayout, moc_attention, route
from engine.moc.attention import reference_attention

from .conftest import interpreter_numpy_shim

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available() and not INTERPRET
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = [pytest.mark.interpret,
              pytest.mark.skipif(not (CUDA or INTERPRET),
                                 reason="needs a CUDA GPU, or TRITON_INTERPRET=1 in its own pytest process")]


def gpu_only(test):
    return pytest.mark.gpu(pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")(test))

# (name, layout, q_offset): one shot, many shots, text segments, chunk edges off the tile grid
if CUDA:
    LAYOUTS = [
        ("one_shot", TokenLayout(frame_tokens=301, shot_frames=(5,)), 0),
        ("many_shots", TokenLayout(frame_tokens=150, shot_frames=(3, 4, 2, 3)), 0),
        ("text", TokenLayout(frame_tokens=211, shot_frames=(3, 2, 4), text_tokens=(17, 9, 11, 5),
                             text_shots=(-1, 0, 1, 2)), 0),
        ("subframe", TokenLayout(frame_tokens=333, shot_frames=(2, 3), chunking="subframe", chunk_size=100), 0),
        ("q_offset", TokenLayout(frame_tokens=257, shot_frames=(2, 3, 2)), 2 * 257 + 37),
    ]
else:
    LAYOUTS = [
        ("one_shot", TokenLayout(frame_tokens=29, shot_frames=(3,)), 0),
        ("many_shots", TokenLayout(frame_tokens=21, shot_frames=(2, 3, 1)), 0),
        ("text", TokenLayout(frame_tokens=19, shot_frames=(2, 2), text_tokens=(5, 3, 4), text_shots=(-1, 0, 1)), 0),
        ("q_offset", TokenLayout(frame_tokens=23, shot_frames=(2, 2)), 2 * 23 + 5),
    ]
LAYOUT_IDS = [name for name, *_ in LAYOUTS]
TILE = 128 if CUDA else 16
DTYPES = [torch.bfloat16, torch.float16] if CUDA else [torch.float16, torch.float32]


@pytest.fixture(autouse=True, scope="module")
def _interpreter_numpy_shim():
    """The interpreter's numpy patch (conftest.interpreter_numpy_shim), for this module only."""
    if not INTERPRET:
        yield
        return
    with interpreter_numpy_shim():
        yield


def random_qkv(layout, B, H, D, dtype, seed, structured=False):
    """Fresh inputs on DEVICE. structured: per-frame shared vectors plus per-token noise (MOC.md)."""
    g = torch.Generator().manual_seed(seed)
    N = layout.num_tokens
    if structured:
        frame = layout.tensors.token_chunk  # one shared vector per chunk
        base_q = torch.randn(B, H, layout.num_chunks, D, generator=g)
        base_k = base_q + 0.5 * torch.randn(B, H, layout.num_chunks, D, generator=g)
        q = base_q[:, :, frame] + 0.3 * torch.randn(B, H, N, D, generator=g)
        k = base_k[:, :, frame] + 0.3 * torch.randn(B, H, N, D, generator=g)
    else:
        q, k = torch.randn(B, H, N, D, generator=g), torch.randn(B, H, N, D, generator=g)
    v = torch.randn(B, H, N, D, generator=g)
    return [t.to(device=DEVICE, dtype=dtype) for t in (q, k, v)]


def rel(a, b):
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def tolerance(dtype):
    return {torch.bfloat16: 1e-2, torch.float16: 4e-3, torch.float32: 1e-4 if INTERPRET else 2e-3}[dtype]


def check_against_reference(q, k, v, sel, scale=None, grad_tol_factor=2.0, backend="triton", attend=None):
    """Triton output and gradients vs the float32 reference on the same selection; `attend`
    (q, k, v) -> out, when given, runs instead of moc_attention with `backend`."""
    q, k, v = [t.detach().requires_grad_() for t in (q, k, v)]
    out = attend(q, k, v) if attend else moc_attention(q, k, v, sel, backend=backend, scale=scale)
    assert out.shape == q.shape and out.dtype == q.dtype and torch.isfinite(out).all()
    qr, kr, vr = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(qr, kr, vr, sel, scale)
    tol = tolerance(q.dtype)
    assert rel(out, ref) < tol, f"output error {rel(out, ref):.2e}"
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7)).to(ref.device)
    got = torch.autograd.grad((out.float() * w).sum(), (q, k, v))
    want = torch.autograd.grad((ref * w).sum(), (qr, kr, vr))
    for name, a, b in zip("qkv", got, want):
        assert torch.isfinite(a).all(), f"d{name} has non-finite values"
        assert rel(a, b) < grad_tol_factor * tol, f"d{name} error {rel(a, b):.2e}"
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,layout,q_offset", LAYOUTS, ids=LAYOUT_IDS)
def test_attention_matches_reference(name, layout, q_offset, dtype):
    H, D = (3, 64) if CUDA else (2, 64)
    q, k, v = random_qkv(layout, 2 if CUDA else 1, H, D, dtype, seed=10 * LAYOUT_IDS.index(name) + DTYPES.index(dtype))
    q = q[:, :, q_offset:]
    sel = route(q, k, layout, MoCConfig(top_k=2, tile=TILE), q_offset=q_offset, impl="reference")
    check_against_reference(q, k, v, sel)
    assert sel.info["backend"] == "triton"


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "random"])
def test_head_dim_128_and_training_selection(structured):
    """Head dim 128, drop-off / drop-in selections (ragged routed slots), a custom scale."""
    layout = LAYOUTS[1][1]
    q, k, v = random_qkv(layout, 1, 2, 128, DTYPES[0], seed=11 + structured, structured=structured)
    g = torch.Generator(device=DEVICE).manual_seed(3)
    sel = route(q, k, layout, MoCConfig(top_k=3, tile=TILE), training=True, generator=g, impl="reference")
    check_against_reference(q, k, v, sel, scale=0.1)


def test_transposed_views_are_used_in_place():
    """q, k, v as (B, N, H, D) tensors viewed as (B, H, N, D): no copy, output in the same layout."""
    layout = LAYOUTS[2][1]
    B, H, D = 1, 2, 64
    g = torch.Generator().manual_seed(21)
    q, k, v = [torch.randn(B, layout.num_tokens, H, D, generator=g).to(DEVICE, DTYPES[0]).transpose(1, 2)
               for _ in range(3)]
    sel = route(q, k, layout, MoCConfig(top_k=2, tile=TILE), impl="reference")
    out = check_against_reference(q, k, v, sel)
    assert out.stride() == q.stride()


def test_every_query_routes_all_earlier_chunks_is_exact():
    """k >= chunks and no causal rule, chunk anchor: the selection is dense; forcing the Triton
    backend must still equal unmasked attention, and "auto" dispatches to SDPA on the GPU."""
    layout = LAYOUTS[0][1]
    q, k, v = random_qkv(layout, 1, 2, 64, DTYPES[0], seed=5)
    sel = route(q, k, layout, MoCConfig(top_k=99, tile=TILE, causal=False, anchor="chunk"), impl="reference")
    assert sel.density() == 1.0
    out = check_against_reference(q, k, v, sel)
    dense = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert rel(out, dense) < tolerance(q.dtype)
    if CUDA:
        moc_attention(q, k, v, sel, backend="auto")
        assert sel.stats().backend == "sdpa"


def test_wrapper_errors_say_how_to_fix_the_call():
    layout = LAYOUTS[0][1]
    q, k, v = random_qkv(layout, 1, 1, 64, DTYPES[0], seed=1)
    sel = route(q, k, layout, MoCConfig(top_k=1, tile=TILE), impl="reference")
    with pytest.raises(ValueError, match="head dims"):
        moc_attention(q[..., :48], k[..., :48], v[..., :48], sel, backend="triton")
    with pytest.raises(ValueError, match="one dtype"):
        moc_attention(q, k.float(), v, sel, backend="triton")


# ---- routing -----------------------------------------------------------------------------------

def assert_same_routing(q, k, layout, config, ref, got, q_offset=0):
    """Same routed chunk sets; where they differ the scores must tie (summation order aside)."""
    a = ref.routed.sort(-1).values
    b = got.routed.sort(-1).values
    differ = (a != b).any(-1)  # (B, H, Nq)
    if differ.any():
        from engine.moc.routing import chunk_descriptors
        desc = chunk_descriptors(k.double(), layout)  # (B, H, C, D)
        scores = torch.einsum("bhtd,bhcd->bhtc", q.double(), desc)  # small sizes only
        pick = lambda r: torch.where(r >= 0, scores.gather(-1, r.long().clamp(min=0)), 0.0).sort(-1).values
        gap = (pick(ref.routed) - pick(got.routed)).abs().amax(-1)
        assert (gap[differ] < 1e-3 * scores.abs().amax()).all(), "routing differs beyond ties"
        assert differ.float().mean() < 0.01, "too many ties to be ties"
    else:
        assert torch.equal(ref.tile_chunks, got.tile_chunks) and torch.equal(ref.tile_full, got.tile_full)


@pytest.mark.parametrize("anchor,causal", [("shot", True), ("chunk", False), ("window", True)])
@pytest.mark.parametrize("name,layout,q_offset", LAYOUTS, ids=LAYOUT_IDS)
def test_fused_routing_equals_reference(name, layout, q_offset, anchor, causal):
    D = 64 if CUDA else 16
    q, k, _ = random_qkv(layout, 2, 3, D, DTYPES[0], seed=len(name) + causal, structured=anchor == "shot")
    q = q[:, :, q_offset:]
    config = MoCConfig(top_k=3, anchor=anchor, causal=causal, tile=TILE)
    ref = route(q, k, layout, config, q_offset=q_offset, impl="reference")
    got = route(q, k, layout, config, q_offset=q_offset, impl="triton")
    assert got.info["routing"] == "triton"
    assert_same_routing(q[:, :, :], k, layout, config, ref, got, q_offset)


def test_fused_routing_merges_chunk_blocks_like_one(monkeypatch):
    """More chunks than one block scores (BLOCK_C_MAX made 16 here): the running top-k merges
    block after block and gives the reference's top-k, best first, with k = 5 over 20 chunks."""
    import engine.moc.triton_routing as fused
    monkeypatch.setattr(fused, "BLOCK_C_MAX", 16)
    layout = TokenLayout(frame_tokens=64 if CUDA else 6, shot_frames=(4, 5, 4, 7))
    q, k, _ = random_qkv(layout, 1, 2, 64 if CUDA else 16, DTYPES[0], seed=21)
    config = MoCConfig(top_k=5, anchor="chunk", causal=True, tile=TILE)
    ref = route(q, k, layout, config, impl="reference")
    got = route(q, k, layout, config, impl="triton")
    assert layout.num_chunks > 16 and (got.routed >= 0).sum(-1).max() == 5
    assert_same_routing(q, k, layout, config, ref, got)
    from engine.moc.routing import chunk_descriptors
    scores = torch.einsum("bhtd,bhcd->bhtc", q.double(), chunk_descriptors(k.double(), layout).double())
    picked = torch.where(got.routed >= 0, scores.gather(-1, got.routed.long().clamp(min=0)), -torch.inf)
    assert (picked[..., :-1] >= picked[..., 1:] - 1e-3).all()  # best first


def test_fused_routing_training_draws_like_the_reference():
    layout = LAYOUTS[1][1]
    q, k, _ = random_qkv(layout, 1, 2, 64 if CUDA else 16, DTYPES[0], seed=9, structured=True)
    config = MoCConfig(top_k=2, tile=TILE)
    ref = route(q, k, layout, config, training=True, generator=torch.Generator(DEVICE).manual_seed(4),
                impl="reference")
    got = route(q, k, layout, config, training=True, generator=torch.Generator(DEVICE).manual_seed(4),
                impl="triton")
    assert torch.equal(ref.routed, got.routed)


def test_fused_routing_with_cached_descriptors():
    layout = LAYOUTS[-1][1]
    q_offset = LAYOUTS[-1][2]
    q, k, _ = random_qkv(layout, 1, 2, 64 if CUDA else 16, DTYPES[0], seed=13)
    from engine.moc.routing import chunk_descriptors
    desc = chunk_descriptors(k, layout)
    config = MoCConfig(top_k=2, tile=TILE)
    ref = route(q[:, :, q_offset:], k, layout, config, q_offset=q_offset, descriptors=desc, impl="reference")
    got = route(q[:, :, q_offset:], k, layout, config, q_offset=q_offset, descriptors=desc, impl="triton")
    assert torch.equal(ref.routed.sort(-1).values, got.routed.sort(-1).values)


# ---- GPU-only: larger structured layouts, the full pipeline, int64 offsets -----------------------

@gpu_only
@pytest.mark.parametrize("structured", [True, False], ids=["structured", "random"])
def test_moc_like_workload_end_to_end(structured):
    """A scaled-down MoC-180k: 3 shots x 5 frames x 500 tokens, 4 heads x 128, k = 5, bf16,
    fused routing then the Triton kernel, against routing + float32 reference."""
    layout = TokenLayout(frame_tokens=500, shot_frames=(5, 5, 5))
    q, k, v = random_qkv(layout, 1, 4, 128, torch.bfloat16, seed=31, structured=structured)
    config = MoCConfig(top_k=5)
    sel = route(q, k, layout, config)  # "auto": fused on the GPU
    assert sel.info["routing"] == "triton"
    assert_same_routing(q, k, layout, config, route(q, k, layout, config, impl="reference"), sel)
    check_against_reference(q, k, v, sel)
    moc_attention(q, k, v, sel, backend="auto")
    assert sel.stats().backend == "triton"


@gpu_only
def test_offsets_past_2_31_elements():
    """The second batch starts past element 2^31 of its storage: offsets must be int64."""
    layout = TokenLayout(frame_tokens=200, shot_frames=(2, 2))
    B, H, N, D = 2, 2, layout.num_tokens, 64
    stride_b = 2 ** 31 + 64
    tensors = []
    for seed in range(3):
        storage = torch.empty(stride_b + H * N * D, device="cuda", dtype=torch.bfloat16)
        t = storage.as_strided((B, H, N, D), (stride_b, N * D, D, 1))
        t.copy_(torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(seed)).to("cuda", torch.bfloat16))
        tensors.append(t)
    q, k, v = tensors
    sel = route(q, k, layout, MoCConfig(top_k=1))
    check_against_reference(q, k, v, sel)
    del tensors, q, k, v
    torch.cuda.empty_cache()


@pytest.mark.parametrize("name,layout,q_offset", LAYOUTS, ids=LAYOUT_IDS)
def test_key_range_kernel_matches_its_pytorch_reference(name, layout, q_offset):
    """The plan kernel against key_ranges_reference, and the ranges cover exactly each tile's union."""
    from engine.moc.triton_attention import key_ranges, key_ranges_reference
    q, k, _ = random_qkv(layout, 2, 3, 16, torch.float32, seed=3)
    sel = route(q[:, :, q_offset:], k, layout, MoCConfig(top_k=2, tile=TILE), q_offset=q_offset, impl="reference")
    got, want = key_ranges(sel), key_ranges_reference(sel)
    assert torch.equal(got.count, want.count)
    used = torch.arange(got.lo.shape[-1], device=got.lo.device) < got.count[..., None]
    for a, b in ((got.lo, want.lo), (got.hi, want.hi), (got.chunk, want.chunk)):
        assert torch.equal(torch.where(used, a, 0), torch.where(used, b, 0))
    clen = sel.layout.tensors.chunk_len.to(got.lo.device)
    union_keys = torch.where(sel.tile_chunks >= 0, clen[sel.tile_chunks.long().clamp(min=0)], 0).sum(-1)
    assert torch.equal(got.keys_per_tile(), union_keys)


def test_row_order_permutes_rows_within_their_chunk():
    """The kernels' row order is a permutation per (batch, head) that keeps every row in its chunk
    (so forced links are unchanged) and never grows the tiles' unions on these inputs."""
    from engine.moc.triton_attention import kernel_plan, token_chunks
    layout, q_offset = LAYOUTS[-1][1], LAYOUTS[-1][2]
    q, k, _ = random_qkv(layout, 2, 3, 16, torch.float32, seed=8)
    sel = route(q[:, :, q_offset:], k, layout, MoCConfig(top_k=2, tile=TILE), q_offset=q_offset, impl="reference")
    plan = kernel_plan(sel)
    Nq = sel.routed.shape[2]
    perm = plan.perm.long()
    assert torch.equal(perm.sort(-1).values, torch.arange(Nq, device=perm.device).expand_as(perm))
    qc = token_chunks(layout, q_offset, q_offset + Nq, perm.device)
    assert torch.equal(qc[perm], qc.expand_as(perm))
    assert torch.equal(plan.tiles.token_mask(), sel.token_mask().gather(2, perm[..., None].expand(-1, -1, -1, layout.num_chunks)))


def test_auto_dispatch_knows_what_the_kernel_supports():
    """attention.py keeps its own copy of the kernel's head dims and dtypes (it imports Triton
    lazily); the two must agree."""
    from engine.moc import attention, triton_attention
    assert attention.TRITON_HEAD_DIMS == triton_attention.HEAD_DIMS
    assert attention.TRITON_DTYPES == triton_attention.DTYPES


def test_fused_routing_keeps_pins_and_blocks():
    """Memory pins are forced links and blocks leave the candidates, in the fused routing too."""
    layout = LAYOUTS[1][1]  # three or four shots
    q, k, _ = random_qkv(layout, 2, 3, 64 if CUDA else 16, DTYPES[0], seed=5, structured=True)
    last = len(layout.shot_frames) - 1
    config = MoCConfig(top_k=1, tile=TILE, pins=((last, 0),), blocks=((last, 1),))
    ref = route(q, k, layout, config, impl="reference")
    got = route(q, k, layout, config, impl="triton")
    assert_same_routing(q, k, layout, config, ref, got, 0)
    shot = layout.tensors.chunk_shot.to(got.routed.device)
    mask = got.token_mask()  # (B, H, N, C)
    rows = shot[got.query_chunks.to(shot.device)] == last
    assert mask[:, :, rows][..., shot == 0].all() and not mask[:, :, rows][..., shot == 1].any()


def test_a_regeneration_step_routes_and_attends_like_the_reference():
    """A both-sided regeneration training step (engine/training.regeneration_step: one open shot
    that may look ahead, the later shots blocked from it) in training mode: the fused routing draws
    the reference's selection, and the tile kernel and gather give its values and gradients."""
    layout = LAYOUTS[1][1]  # three or four shots
    S = len(layout.shot_frames)
    q, k, v = random_qkv(layout, 2, 2, 64, DTYPES[0], seed=11, structured=True)
    config = MoCConfig(top_k=2, tile=TILE, open_shots=(0,), blocks=tuple((j, 0) for j in range(1, S)))
    ref = route(q, k, layout, config, training=True, impl="reference",
                generator=torch.Generator(device=DEVICE).manual_seed(4))
    got = route(q, k, layout, config, training=True, impl="triton",
                generator=torch.Generator(device=DEVICE).manual_seed(4))
    assert torch.equal(ref.routed.cpu(), got.routed.cpu())
    shot = layout.tensors.chunk_shot.to(got.routed.device)
    mask = got.token_mask()
    rows = shot[got.query_chunks.to(shot.device)]
    video = ~layout.tensors.chunk_is_text.to(shot.device)
    assert mask[:, :, rows == 0][..., (shot > 0) & video].any()  # the open shot looks ahead
    assert not mask[:, :, rows > 0][..., shot == 0].any()  # no later shot sees it
    check_against_reference(q, k, v, got)
    check_gather(q, k, v, got)


@pytest.mark.parametrize("training", [False, True])
def test_open_shots_with_their_own_top_k_route_and_attend_like_the_reference(training):
    """A both-sided regeneration whose later chunks have a top-k of their own (open_top_k): the
    fused routing writes the reference's selection (the causal top-k, then the later one), in
    training the same draws, and the tile kernel and gather give its values and gradients."""
    layout = LAYOUTS[1][1]
    S = len(layout.shot_frames)
    q, k, v = random_qkv(layout, 2, 2, 64, DTYPES[0], seed=12, structured=False)
    config = MoCConfig(top_k=2, tile=TILE, open_shots=(0,), open_top_k=3,
                       blocks=tuple((j, 0) for j in range(1, S)))
    gen = (lambda: torch.Generator(device=DEVICE).manual_seed(6)) if training else (lambda: None)
    ref = route(q, k, layout, config, training=training, impl="reference", generator=gen())
    got = route(q, k, layout, config, training=training, impl="triton", generator=gen())
    assert got.routed.shape[-1] == (config.max_routed if training else config.routed_slots)
    assert torch.equal(ref.routed.cpu(), got.routed.cpu())
    if not training:
        closed = route(q, k, layout, replace(config, open_shots=(), open_top_k=0), impl="triton")
        assert torch.equal(got.routed[..., :2].cpu(), closed.routed.cpu())  # every causal pick kept
    check_against_reference(q, k, v, got)
    check_gather(q, k, v, got)


def test_a_regenerations_layouts_share_one_compiled_routing_variant(monkeypatch):
    """Every compiled variant of the routing top-k is autotuned over 8 configs on first use (on an
    H100 a cold both-sided regeneration of the 180k story spent about 50 s on them). The context
    passes over 1, 2, ... shots, the joint pass over all of them and the open shots' own top-k
    over later chunks must all launch the same constexprs, and the gather kernels one chunk
    bucket for all of them."""
    from engine.moc import triton_routing
    from engine.moc.triton_attention import CHUNK_BUCKET_MIN, chunk_bucket
    seen = set()

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **meta):
                seen.add(tuple(sorted((k, v) for k, v in meta.items() if k != "BLOCK_M")))
                return self.kernel[grid](*args, **meta)
            return launch

    name = "_route_topk_tuned" if CUDA else "_route_topk"
    monkeypatch.setattr(triton_routing, name, Recorder(getattr(triton_routing, name)))
    frames = (2, 1, 3, 2, 2)
    for shots in range(1, len(frames) + 1):
        layout = TokenLayout(frame_tokens=13 if INTERPRET else 150, shot_frames=frames[:shots])
        q, k, _ = random_qkv(layout, 1, 2, 64, DTYPES[0], seed=shots, structured=False)
        for config in (MoCConfig(top_k=2, tile=TILE), MoCConfig(top_k=2, tile=TILE, open_shots=(0,), open_top_k=1)):
            sel = route(q, k, layout, config, impl="triton")
            ref = route(q, k, layout, config, impl="reference")
            assert torch.equal(ref.routed.cpu(), sel.routed.cpu())
    assert len(seen) == 1, seen
    assert {chunk_bucket(c) for c in range(1, CHUNK_BUCKET_MIN + 1)} == {CHUNK_BUCKET_MIN}
    assert chunk_bucket(CHUNK_BUCKET_MIN + 1) == 2 * CHUNK_BUCKET_MIN


# ---- backend "gather": the routed part per key chunk -------------------------------------------

def check_gather(q, k, v, sel, scale=None, forced=None):
    """Values and gradients against the reference, and the no-grad path's values. forced=None:
    through moc_attention (step 1, and the backward of its links, as FORCED_DEFAULT says for the
    device with and without gradients; "sdpa" is cuDNN on the GPU, PyTorch's CPU flash kernel
    here); else gather_moc_attention with that step 1. Either way what ran must be what was asked
    for, except "sdpa" on the GPU in fp32, which runs the tile kernel (cuDNN takes fp16/bf16)."""
    from engine.moc.triton_gather import forced_default, gather_moc_attention

    def runs(step1: str) -> str:  # what step 1 runs when `step1` is asked for
        return "triton" if step1 == "sdpa" and CUDA and q.dtype == torch.float32 else step1  # no fp32 cuDNN

    if forced is None:
        out = check_against_reference(q, k, v, sel, scale=scale, backend="gather")
        assert sel.info["backend"] == "gather"
        ran_with_grad = sel.info["forced"]
        with torch.no_grad():
            plain = moc_attention(q, k, v, sel, backend="gather", scale=scale)
        assert ran_with_grad == runs(forced_default(q.device.type, True)), sel.info["forced_reason"]
        expect = runs(forced_default(q.device.type, False))
    else:
        out = check_against_reference(q, k, v, sel, attend=lambda q, k, v: gather_moc_attention(
            q, k, v, sel, scale=scale, forced=forced))
        with torch.no_grad():
            plain = gather_moc_attention(q, k, v, sel, scale=scale, forced=forced)
        expect = runs(forced)
    assert sel.info["forced"] == expect, sel.info["forced_reason"]
    if forced is None and expect != ran_with_grad:
        # step 1 ran two ways with and without gradients: two code paths, each against the reference
        ref = reference_attention(q.float(), k.float(), v.float(), sel, scale)
        assert rel(plain, ref) < tolerance(q.dtype), f"no-grad output error {rel(plain, ref):.2e}"
    else:
        assert rel(plain, out) < 1e-6  # the forward is one code path with and without autograd
    return out


def merge_reference(o_f, lse_f, o_r, lse_r):
    """Step 3 in float32 torch: the R + 1 partial results weighted by their log-sum-exp (log2)."""
    B, H, Nq, D = o_f.shape
    lse = torch.cat([lse_f[..., None], lse_r.view(B, H, Nq, -1)], dim=-1)
    m = lse.amax(-1, keepdim=True)
    w = torch.exp2(lse - m)
    parts = torch.cat([o_f.float()[..., None, :], o_r.view(B, H, Nq, -1, D).float().nan_to_num(0.0)], dim=-2)
    total = w.sum(-1)
    return (w[..., None] * parts).sum(-2) / total[..., None], (m[..., 0] + torch.log2(total))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_merge_kernel_matches_torch_and_skips_empty_slots(dtype):
    """merge_partials against merge_reference at an odd row count, with a quarter of the routed
    slots empty (lse -inf) and their outputs NaN (never written), into a head slice of a wider out."""
    from engine.moc.triton_gather import merge_partials
    seed = int(torch.randint(0, 2**31 - 1, ()))
    g = torch.Generator().manual_seed(seed)
    B, H, Nq, R, D = 2, 3, 37 if not CUDA else 1237, 3, 64
    o_f = torch.randn(B, H, Nq, D, generator=g).to(dtype)
    lse_f = torch.randn(B, H, Nq, generator=g) * 4
    o_r = torch.randn(B * H, Nq * R, D, generator=g).to(dtype)
    lse_r = torch.randn(B * H, Nq * R, generator=g) * 4
    empty = torch.rand(B * H, Nq * R, generator=g) < 0.25
    lse_r[empty] = float("-inf")
    o_r[empty] = float("nan")
    o_f, lse_f, o_r, lse_r = (x.to(DEVICE) for x in (o_f, lse_f, o_r, lse_r))
    wide = torch.zeros(B, H + 2, Nq, D, dtype=dtype, device=DEVICE)
    out = wide[:, 1:H + 1]  # a view with the head stride of a wider tensor, as gather's head groups give
    lse = merge_partials(o_f, lse_f, o_r, lse_r, out)
    want, want_lse = merge_reference(o_f, lse_f, o_r, lse_r)
    assert torch.isfinite(out).all() and rel(out, want) < tolerance(dtype), f"seed {seed}"
    assert (lse - want_lse).abs().max() < 1e-4, f"seed {seed}"
    assert (wide[:, 0] == 0).all() and (wide[:, H + 1] == 0).all()  # nothing written outside the slice


@pytest.mark.parametrize("forced", [None, "sdpa", "triton"] if CUDA else [None, "triton"],  # CPU: None is "sdpa"
                         ids=["forced_default", "forced_sdpa", "forced_triton"] if CUDA else ["forced_sdpa", "forced_triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,layout,q_offset", LAYOUTS, ids=LAYOUT_IDS)
def test_gather_matches_reference(name, layout, q_offset, dtype, forced):
    H, D = (3, 64) if CUDA else (2, 64)
    q, k, v = random_qkv(layout, 2, H, D, dtype, seed=100 + 10 * LAYOUT_IDS.index(name) + DTYPES.index(dtype))
    q = q[:, :, q_offset:]
    sel = route(q, k, layout, MoCConfig(top_k=2, tile=TILE), q_offset=q_offset, impl="reference")
    check_gather(q, k, v, sel, forced=forced)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_forced_sdpa_with_captions_and_pins(dtype):
    """forced="sdpa" where the forced groups are not one contiguous block: a shot's caption and
    its frames are two query ranges over three key ranges (global caption, caption, frames), and a
    pinned shot adds another shot's frames; odd sizes, three heads. Values and gradients against
    the reference, and the same attention as forced="triton"."""
    from engine.moc.forced import forced_groups
    layout = (TokenLayout(frame_tokens=101, shot_frames=(2, 3, 1), text_tokens=(13, 7, 9, 5),
                          text_shots=(-1, 0, 1, 2)) if CUDA else
              TokenLayout(frame_tokens=17, shot_frames=(2, 1, 2), text_tokens=(5, 3, 4, 2), text_shots=(-1, 0, 1, 2)))
    q, k, v = random_qkv(layout, 1, 3, 64, dtype, seed=171 + DTYPES.index(dtype))
    sel = route(q, k, layout, MoCConfig(top_k=2, tile=TILE, pins=((2, 0),)), impl="reference")
    groups = forced_groups(sel)
    assert len(groups) == layout.num_shots + 1 and max(len(g.keys) for g in groups) >= 3
    out = check_gather(q, k, v, sel, forced="sdpa")
    assert rel(out, check_gather(q, k, v, sel, forced="triton")) < tolerance(dtype)


def test_gather_forced_falls_back_to_the_tile_kernel_and_says_why(monkeypatch):
    """Where the forced links make more groups than FORCED_SDPA_MAX_GROUPS (here: a per-chunk
    anchor), forced="sdpa" runs the tile kernel, records why, and stays exact."""
    from engine.moc import forced as forced_module
    name, layout, q_offset = LAYOUTS[1]
    q, k, v = random_qkv(layout, 1, 2, 64, DTYPES[-1], seed=181)
    sel = route(q, k, layout, MoCConfig(top_k=2, tile=TILE, anchor="chunk"), impl="reference")
    monkeypatch.setattr(forced_module, "FORCED_SDPA_MAX_GROUPS", layout.num_chunks - 1)
    from engine.moc.triton_gather import gather_moc_attention
    out = check_against_reference(q, k, v, sel, attend=lambda q, k, v: gather_moc_attention(q, k, v, sel, forced="sdpa"))
    assert sel.info["forced"] == "triton"
    assert sel.info["forced_reason"] == forced_module.FALLBACK_REASONS["groups"]
    monkeypatch.setattr(forced_module, "FORCED_SDPA_MAX_GROUPS", layout.num_chunks)  # now it fits
    with torch.no_grad():
        grouped = gather_moc_attention(q, k, v, sel, forced="sdpa")
    assert sel.info["forced"] == ("triton" if CUDA and q.dtype == torch.float32 else "sdpa")
    assert rel(grouped, out) < tolerance(q.dtype)
    with pytest.raises(ValueError, match="forced must be one of"):
        gather_moc_attention(q, k, v, sel, forced="cudnn")


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "random"])
def test_gather_head_dim_128_ragged_slots_and_scale(structured):
    """Drop-off / drop-in selections leave ragged, partly empty routed slots; head dim 128."""
    layout = LAYOUTS[1][1]
    q, k, v = random_qkv(layout, 1, 2, 128, DTYPES[0], seed=131 + structured, structured=structured)
    g = torch.Generator(device=DEVICE).manual_seed(4)
    sel = route(q, k, layout, MoCConfig(top_k=3, tile=TILE), training=True, generator=g, impl="reference")
    assert bool((sel.routed < 0).any()) and bool((sel.routed >= 0).any())
    check_gather(q, k, v, sel, scale=0.1)


@pytest.mark.parametrize("group_bytes", [1, "two heads"], ids=["one_head", "two_heads"])
def test_gather_in_head_groups_matches_reference(monkeypatch, group_bytes):
    """Under a small buffer budget "gather" runs its heads in groups (one at a time, or two then
    one of three heads, with a context offset): values and gradients stay the reference's, with
    step 1 (run once over all heads, into the output the groups then merge into) either way."""
    from engine.moc import triton_gather
    name, layout, q_offset = LAYOUTS[-1]
    q, k, v = random_qkv(layout, 2, 3, 64, DTYPES[-1], seed=151)
    q = q[:, :, q_offset:]
    sel = route(q, k, layout, MoCConfig(top_k=2, tile=TILE), q_offset=q_offset, impl="reference")
    if group_bytes == "two heads":  # the budget of two heads' buffers with gradients, exactly
        group_bytes = 2 * triton_gather.head_buffer_bytes(q, sel.routed.shape[-1], grad=True)
    monkeypatch.setattr(triton_gather, "GATHER_BUFFER_BYTES", group_bytes)
    monkeypatch.setattr(triton_gather, "GATHER_FWD_BUFFER_BYTES", group_bytes)  # the no-grad budget
    expect = 1 if group_bytes == 1 else 2
    assert triton_gather.heads_per_group(q, sel.routed.shape[-1], grad=True) == expect
    no_grad = min(3, group_bytes // triton_gather.head_buffer_bytes(q, sel.routed.shape[-1], grad=False))
    assert triton_gather.heads_per_group(q, sel.routed.shape[-1], grad=False) == max(1, no_grad)
    check_gather(q, k, v, sel)
    check_gather(q, k, v, sel, forced="triton")  # its backward plans the forced links per group
    # every group in one autograd node writing one output (no concatenation, one dQ / dK / dV)
    out = triton_gather.gather_moc_attention(q.detach().requires_grad_(), k, v, sel)
    assert type(out.grad_fn).__name__ == "_GatherAttentionBackward"


@pytest.mark.parametrize("name,layout,q_offset", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("forced", ["sdpa", "triton"])
def test_gather_in_place_merge_matches_reference(name, layout, q_offset, forced):
    """merge="in_place" (no per-pair buffers: one launch per routed slot folding its partial
    results into the output) against the float32 reference and the buffered merge, at odd sizes,
    with drop-off / drop-in leaving ragged slots, captions and a context offset; with gradients
    the buffered path runs whatever `merge` says."""
    from engine.moc.triton_gather import gather_moc_attention
    dtype = DTYPES[0]
    q, k, v = random_qkv(layout, 2, 3, 64, dtype, seed=171 + len(name))
    q = q[:, :, q_offset:]
    g = torch.Generator(device=DEVICE).manual_seed(5)
    sel = route(q, k, layout, MoCConfig(top_k=3, tile=TILE), q_offset=q_offset, training=True, generator=g,
                impl="reference")
    ref = reference_attention(q.float(), k.float(), v.float(), sel)
    with torch.no_grad():
        in_place = gather_moc_attention(q, k, v, sel, forced=forced, merge="in_place")
        assert sel.info["merge"] == "in_place"
        buffered = gather_moc_attention(q, k, v, sel, forced=forced, merge="buffers")
    assert in_place.dtype == q.dtype and in_place.shape == q.shape
    assert rel(in_place, ref) < tolerance(dtype), f"{rel(in_place, ref):.2e}"
    assert rel(in_place, buffered) < tolerance(dtype)
    with pytest.raises(ValueError, match="merge must be one of"):
        gather_moc_attention(q, k, v, sel, merge="fused")
    qg = q.detach().requires_grad_()
    out = gather_moc_attention(qg, k, v, sel, forced=forced, merge="in_place")
    assert type(out.grad_fn).__name__ == "_GatherAttentionBackward"
    assert rel(out, ref) < tolerance(dtype)


def ragged_case(dtype, seed: int, draw: int):
    """q, k, v (batch 2, 3 heads x 64) on the last test layout with its context offset, and a
    training-mode selection (drop-off / drop-in: ragged slots): the head-group, piece and pass tests."""
    _, layout, q_offset = LAYOUTS[-1]
    q, k, v = random_qkv(layout, 2, 3, 64, dtype, seed=seed)
    q = q[:, :, q_offset:]
    g = torch.Generator(device=DEVICE).manual_seed(draw)
    sel = route(q, k, layout, MoCConfig(top_k=3, tile=TILE), q_offset=q_offset, training=True, generator=g,
                impl="reference")
    return q, k, v, sel


@pytest.mark.parametrize("heads_at_once", [1, 2])
def test_gather_in_place_in_head_groups_matches_reference(monkeypatch, heads_at_once):
    """The in-place merge sorts and runs a group of heads at a time (in_place_heads_per_group, under
    GATHER_IN_PLACE_BUFFER_BYTES): one head at a time, or two then one of three, batch 2, a context
    offset and ragged slots, gives the float32 reference's output and the buffered merge's."""
    from engine.moc import triton_gather
    q, k, v, sel = ragged_case(DTYPES[0], seed=181 + heads_at_once, draw=6)
    R = sel.routed.shape[-1]
    monkeypatch.setattr(triton_gather, "GATHER_IN_PLACE_BUFFER_BYTES",
                        heads_at_once * triton_gather.in_place_head_bytes(q, R))
    assert triton_gather.in_place_heads_per_group(q, R) == heads_at_once
    ref = reference_attention(q.float(), k.float(), v.float(), sel)
    with torch.no_grad():
        in_place = triton_gather.gather_moc_attention(q, k, v, sel, merge="in_place")
        buffered = triton_gather.gather_moc_attention(q, k, v, sel, merge="buffers")
    assert rel(in_place, ref) < tolerance(q.dtype), f"{rel(in_place, ref):.2e}"
    assert rel(in_place, buffered) < tolerance(q.dtype)


@pytest.mark.parametrize("budget_rows", [1, 37])
def test_gather_without_gradients_in_query_pieces_is_the_same_output(monkeypatch, budget_rows):
    """Without gradients a head whose partial outputs pass GATHER_FWD_PIECE_BYTES runs its queries
    in pieces (one tile of rows at the smallest; or 37 rows, off the tile grid), one head at a
    time: the same output bit for bit as all queries at once, and the reference's; batch 2, a
    context offset and ragged slots."""
    from engine.moc import triton_gather
    q, k, v, sel = ragged_case(DTYPES[0], seed=191 + budget_rows, draw=7)
    R = sel.routed.shape[-1]
    with torch.no_grad():
        whole = triton_gather.gather_moc_attention(q, k, v, sel, merge="buffers")
        assert triton_gather.query_rows_per_piece(q, R) == q.shape[2]  # fits: no pieces
        per_row = 2 * R * 64 * q.element_size()
        monkeypatch.setattr(triton_gather, "GATHER_FWD_PIECE_BYTES", budget_rows * per_row)
        rows = triton_gather.query_rows_per_piece(q, R)
        assert rows == max(budget_rows, triton_gather.GATHER_BLOCK[DEVICE][0]) < q.shape[2]
        pieces = triton_gather.gather_moc_attention(q, k, v, sel, merge="buffers")
    assert torch.equal(pieces, whole)
    assert rel(pieces, reference_attention(q.float(), k.float(), v.float(), sel)) < tolerance(q.dtype)


@pytest.mark.parametrize("groups", ["one", "per_head"])
def test_gather_backward_sums_dq_a_few_heads_at_a_time(monkeypatch, groups):
    """Where step 1 ran through SDPA, the backward runs the forced links' backward once over all
    heads and sums the routed dQ in float32 one pass of heads at a time (dq_heads_per_pass, under
    GATHER_DQ_BYTES), starting from the forced share: the same gradients bit for bit as one pass
    of every head (on a GPU dQ to cuDNN's own run-to-run rounding), and the reference's; batch 2, a context offset, ragged slots, and the forward in
    one head group or one group per head."""
    from engine.moc import triton_gather
    q, k, v, sel = ragged_case(DTYPES[-1], seed=201, draw=8)
    if groups == "per_head":
        monkeypatch.setattr(triton_gather, "GATHER_BUFFER_BYTES", 1)
    do = torch.randn_like(q)

    def grads():
        qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
        out = triton_gather.gather_moc_attention(qq, kk, vv, sel, forced="sdpa")
        assert sel.info["forced"] == ("triton" if CUDA and q.dtype == torch.float32 else "sdpa")
        return torch.autograd.grad(out, (qq, kk, vv), do)

    assert triton_gather.dq_heads_per_pass(q) == 3  # all heads in one pass at these sizes
    whole = grads()
    monkeypatch.setattr(triton_gather, "GATHER_DQ_BYTES", 1)
    assert triton_gather.dq_heads_per_pass(q) == 1
    passes = grads()
    for name, a, b in zip("qkv", passes, whole):
        if CUDA and name == "q":
            # cuDNN's SDPA backward accumulates dQ with atomics: on an H100 two runs of the same
            # call differ by an ulp (6.1e-5 at this scale, measured), one head a pass or not
            torch.testing.assert_close(a, b, rtol=0, atol=5e-4)
        else:
            assert torch.equal(a, b)
    check_gather(q, k, v, sel, forced="sdpa")  # values and gradients against the reference, one head a pass


def test_gather_equals_the_tile_kernel():
    layout = LAYOUTS[2][1]
    q, k, v = random_qkv(layout, 1, 2, 64, DTYPES[-1], seed=141)
    sel = route(q, k, layout, MoCConfig(top_k=2, tile=TILE), impl="reference")
    tiles = check_against_reference(q, k, v, sel)
    assert rel(check_gather(q, k, v, sel), tiles) < tolerance(q.dtype)


@gpu_only
def test_graphed_gather_replays_the_eager_forward_on_new_inputs():
    """GraphedAttention (engine/moc/graphed.py): routing + gather captured once in a CUDA graph and
    replayed on inputs it has not seen (two fresh draws, random then structured, with captions and
    a context offset) gives the eager path's output and the float32 reference's, each time."""
    from engine.moc import attend
    from engine.moc.graphed import GraphedAttention
    layout = LAYOUTS[2][1]  # captions, chunk edges off the tile grid
    q_offset = 211 + 5
    config = MoCConfig(top_k=2, tile=TILE)
    B, H, D = 1, 3, 64
    Nq = layout.num_tokens - q_offset
    graphed = GraphedAttention(layout, config, (B, H, Nq, D), (B, H, layout.num_tokens, D), torch.bfloat16,
                               DEVICE, q_offset=q_offset)
    for seed, structured in ((31, False), (32, True)):
        q, k, v = random_qkv(layout, B, H, D, torch.bfloat16, seed=seed, structured=structured)
        q = q[:, :, q_offset:].contiguous()
        got = graphed(q, k, v).clone()
        want, sel = attend(q, k, v, layout, config, backend="gather", q_offset=q_offset)
        assert rel(got, want) < 1e-3
        assert rel(got, reference_attention(q.float(), k.float(), v.float(), sel)) < tolerance(q.dtype)
    with pytest.raises(ValueError, match="as captured"):
        graphed(q[:, :, 1:], k, v)


@gpu_only
def test_auto_without_gradients_replays_a_captured_graph_and_matches_eager(monkeypatch):
    """attend(backend="auto") with no gradients at GATHER_MIN_KEYS..GRAPH_MAX_KEYS keys replays a
    CUDA graph (graphed_attend): on fresh inputs each call, at an odd layout with a context offset
    and pre-RoPE routing inputs, it equals the eager call (same selection, same output), returns a
    fresh tensor each time, and with gradients it runs eagerly."""
    import engine.moc.attention as am
    from engine.moc import TokenLayout, attend
    monkeypatch.setattr(am, "dense_is_faster", lambda *args: False)  # two small heads: dense would win
    monkeypatch.setattr(am, "AUTO_GRAPHS", True)
    layout = TokenLayout(frame_tokens=137, shot_frames=(31, 29, 33))  # 12,741 keys, chunks off the tiles
    assert am.GATHER_MIN_KEYS <= layout.num_tokens <= am.GRAPH_MAX_KEYS
    q_offset = 31 * 137 + 50
    config = MoCConfig(top_k=3)
    outs = []
    for seed, structured in ((41, False), (42, True), (43, True)):
        q, k, v = random_qkv(layout, 2, 2, 64, torch.bfloat16, seed=seed, structured=structured)
        qr, kr = random_qkv(layout, 2, 2, 64, torch.bfloat16, seed=seed + 100, structured=structured)[:2]
        q, qr = q[:, :, q_offset:].contiguous(), qr[:, :, q_offset:].contiguous()
        with torch.no_grad():
            got, sel = attend(q, k, v, layout, config, q_offset=q_offset, q_route=qr, k_route=kr)
            routed = sel.routed.clone()
            want, eager = attend(q, k, v, layout, config, q_offset=q_offset, q_route=qr, k_route=kr, graph=False)
        assert sel.info.get("graph") and not eager.info.get("graph") and eager.info["backend"] == "gather"
        assert torch.equal(routed, eager.routed)
        assert rel(got, want) < 1e-3
        outs.append((got, want))
    for got, want in outs:  # an earlier output is not overwritten by later replays
        assert rel(got, want) < 1e-3
    q.requires_grad_(True)
    _, sel = attend(q, k, v, layout, config, q_offset=q_offset, q_route=qr, k_route=kr)
    assert not sel.info.get("graph")


def test_auto_sends_tiles_that_route_apart_to_gather(monkeypatch):
    """sparse_choice ("auto" on the GPU): the walk ratio is the plan's tile rows x union keys over
    the attended pairs; routing shared by whole chunks (structured inputs) walks less than routing
    that differs row by row (random inputs), and "gather" is chosen exactly where the ratio reaches
    GATHER_MIN_WALK; the tile kernels get the plan the ratio was measured on, and compute the same
    attention with it."""
    from engine.moc import attention
    from engine.moc.triton_attention import kernel_plan, triton_moc_attention, walk_ratio
    layout = TokenLayout(frame_tokens=67, shot_frames=(3, 4, 3))
    clen = layout.tensors_on(DEVICE).chunk_len.double()
    monkeypatch.setattr(attention, "GATHER_MIN_KEYS", 0)
    ratios, sels = {}, {}
    for structured in (True, False):
        q, k, v = random_qkv(layout, 1, 2, 64, torch.float32, seed=23, structured=structured)
        sel = route(q, k, layout, MoCConfig(top_k=2, tile=16), impl="reference")
        plan = kernel_plan(sel)
        ids = plan.tiles.tile_chunks.long()
        walked = float(torch.where(ids >= 0, clen[ids.clamp(min=0)], 0.0).sum()) * sel.tile
        attended = float((sel.token_mask().double() * clen).sum())
        ratios[structured], sels[structured] = walk_ratio(sel, plan), (q, k, v, sel)
        assert ratios[structured] == pytest.approx(walked / attended)
        assert ratios[structured] >= 1.0
    assert ratios[False] > ratios[True]
    monkeypatch.setattr(attention, "GATHER_MIN_WALK", (ratios[False] + ratios[True]) / 2)
    for structured, want in ((True, "triton"), (False, "gather")):
        q, k, v, sel = sels[structured]
        name, plan = attention.sparse_choice(sel, grad=True)
        assert name == want and sel.info["walk_ratio"] == pytest.approx(ratios[structured], abs=1e-3)
        if want == "triton":
            out = triton_moc_attention(q, k, v, sel, plan=plan)
            assert rel(out, reference_attention(q, k, v, sel)) < tolerance(q.dtype)
        else:
            assert plan is None
    monkeypatch.setattr(attention, "GATHER_MIN_KEYS", layout.num_tokens + 1)  # too short a story
    assert attention.sparse_choice(sels[False][3]) == ("triton", None)
    monkeypatch.setattr(attention, "GATHER_MIN_KEYS", 0)
    for structured in (True, False):  # rendering: gather whatever the walk, which is not measured
        sel = sels[structured][3]
        sel.info.pop("walk_ratio", None)
        assert attention.sparse_choice(sel, grad=False) == ("gather", None)
        assert "walk_ratio" not in sel.info
    monkeypatch.setattr(attention, "GATHER_MIN_WALK_RENDER", (ratios[False] + ratios[True]) / 2)
    assert attention.sparse_choice(sels[True][3], grad=False)[0] == "triton"  # a render threshold above 1 measures
