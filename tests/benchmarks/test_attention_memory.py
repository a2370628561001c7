"""benchmarks/attention_memory.py: the allocation trace counts what is live, and the traced forwards
hold what their code allocates (the 16k workload: a second each on the CPU; 64k for the pieces)."""

import os

import torch

from benchmarks import attention_memory
from benchmarks.attention import HEAD_DIM, HEADS
from engine.moc import triton_gather


def test_the_trace_counts_live_storages_not_views_or_inputs():
    given = torch.zeros(1000)  # allocated before the trace: never counted
    with attention_memory.AllocationTrace() as traced:
        a = torch.empty(1000)  # 4,000 bytes
        b = torch.empty(500, dtype=torch.float64)  # 4,000
        view = a[10:].view(-1, 10)  # a view: no new storage
        given.add_(1)  # in place on an input
        assert sum(n for _, n, _ in traced.live.values()) == 8000
        del a, view
        c = torch.empty(250)  # a is gone by now: 5,000 live
        assert sum(n for _, n, _ in traced.live.values()) == 5000
    assert traced.peak == 8000
    assert sorted(what for _, what in traced.at_peak) == ["empty (1000,) float32", "empty (500,) float64"]
    del b, c


def test_the_16k_forwards_hold_what_their_code_allocates():
    env = os.environ.get("TRITON_INTERPRET")
    kernels = dict(vars(triton_gather))
    with attention_memory.stubbed_kernels() as stubbed:
        assert "triton_gather._routed_fwd_into" in stubbed and "triton_routing._route_topk" in stubbed
        rows = {way: attention_memory.trace("16k", way, top=50) for way in attention_memory.WAYS}
    dense, buffers, pieces, in_place = (rows[way] for way in ("dense", "gather-buffers", "gather-pieces",
                                                              "gather-in-place"))
    # put back on leaving: the kernels and the environment
    assert os.environ.get("TRITON_INTERPRET") == env
    assert triton_gather._routed_fwd_into is kernels["_routed_fwd_into"]
    N = 8 * 15 * 136
    out = N * HEADS * HEAD_DIM * 2  # bf16
    assert dense["tokens"] == N
    assert round(dense["peak_gib"] * 2 ** 30) == out + N * HEADS * 4  # the output and its log-sum-exp
    # the buffered merge holds every slot's partial output of its head group (all 12 heads at 16k)
    partials = N * 5 * HEAD_DIM * 2 * HEADS
    assert any(t["tensor"].startswith("empty (12, 81600, 128)") for t in buffers["live_at_peak"])
    assert buffers["peak_gib"] * 2 ** 30 > out + partials
    assert pieces["peak_gib"] == buffers["peak_gib"]  # 20 MiB a head at 16k: within the pieces' budget, no pieces
    # in place: no per-pair buffer; the output, the selection and one group's pair tables
    assert not any(t["tensor"].startswith("empty (12, 81600, 128)") for t in in_place["live_at_peak"])
    assert out < in_place["peak_gib"] * 2 ** 30 < out + partials / 4


def test_pieces_bound_the_buffers_at_64k():
    """At 64k one head's partial outputs (80 MiB) pass the pieces row's 64 MiB: the buffered merge
    runs one head at a time in pieces, and the largest buffer is at most the budget."""
    from benchmarks.attention import PIECE_BYTES
    with attention_memory.stubbed_kernels():
        buffers, pieces = (attention_memory.trace("64k", way, top=50) for way in ("gather-buffers", "gather-pieces"))
    biggest = max(t["mib"] for t in pieces["live_at_peak"] if t["tensor"].startswith("empty ("))
    assert biggest <= PIECE_BYTES / 2 ** 20
    assert pieces["peak_gib"] < buffers["peak_gib"] - 0.15


def test_with_gradients_the_trace_sees_the_gradients_and_no_float32_dq_of_all_heads():
    """The "+bwd" ways: dense holds its output, log-sum-exp and the three gradients at its peak;
    gather's backward sums dQ in float32 a pass of heads at a time (GATHER_DQ_BYTES), so at 16k
    its peak is the forward's partial outputs, with no float32 dQ of all 12 heads anywhere."""
    with attention_memory.stubbed_kernels():
        dense, gather = (attention_memory.trace("16k", way, top=50) for way in attention_memory.GRAD_WAYS)
    N = 8 * 15 * 136
    one = N * HEADS * HEAD_DIM * 2
    assert round(dense["peak_gib"] * 2 ** 30) == 4 * one + N * HEADS * 4  # out, lse, dq, dk, dv
    live = [t["tensor"] for t in gather["live_at_peak"]]
    assert f"empty (1, 12, {N}, 128) float32" not in live
    assert f"empty (12, {N * 5}, 128) bfloat16" in live  # the routed slots' partial outputs, all heads
    assert gather["peak_gib"] > dense["peak_gib"]
