"""The GPU backends' paths read nothing back from the device (benchmarks/host_reads.py), checked on
the CPU under the Triton interpreter: a read there would make the host wait for the GPU every layer."""

import os

import pytest
import torch

from benchmarks.host_reads import HostReads, forward_reads, training_step_reads
from engine.moc import MoCConfig, TokenLayout, route
from engine.moc.attention import sparse_choice

from .conftest import interpreter_numpy_shim

pytestmark = [pytest.mark.interpret,
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="needs TRITON_INTERPRET=1 in its own pytest process")]


def test_the_detector_names_each_kind_of_read_and_its_call_site():
    x = torch.arange(6.0) - 2
    with HostReads() as reads:
        x.sum().item()
        bool((x > 0).any())
        x[x > 0]
        x.tolist()
        torch.repeat_interleave(x, torch.tensor([1, 0, 2, 1, 1, 1]))
        torch.repeat_interleave(x, torch.tensor([1, 0, 2, 1, 1, 1]), output_size=6)  # sized: no read
        (x * 2).softmax(0).topk(2)  # no read
    ops = {}
    for row in reads.report():  # one row per call site
        ops[row["op"]] = ops.get(row["op"], 0) + row["count"]
    assert ops == {"aten._local_scalar_dense.default": 2, "aten.index.Tensor (boolean index)": 1,
                   "Tensor.tolist": 1, "aten.repeat_interleave.Tensor": 1}
    assert len(reads.report()) == 5 and all("test_host_reads.py:" in row["where"] for row in reads.report())
    assert "HostReads" not in torch.Tensor.tolist.__qualname__  # the methods are restored on exit


def test_it_finds_the_one_read_auto_makes_on_purpose(monkeypatch):
    """The "auto" backend's walk-ratio probe (attention.sparse_choice) reads the ratio on the host
    by design, and only where it runs: with gradients and a threshold above 1.0. With the shipped
    thresholds (1.0 with and without gradients) gather is taken at once and nothing is read."""
    g = torch.Generator().manual_seed(0)
    layout = TokenLayout(frame_tokens=40, shot_frames=(3, 2, 3))
    q, k = (torch.randn(1, 2, layout.num_tokens, 64, generator=g).half() for _ in range(2))
    selection = route(q, k, layout, MoCConfig(top_k=2, tile=16))
    from engine.moc import attention
    monkeypatch.setattr(attention, "GATHER_MIN_KEYS", 0)  # weigh the walk at this tiny size
    for grad in (True, False):
        with interpreter_numpy_shim(), HostReads() as shipped:
            assert sparse_choice(selection, grad=grad) == ("gather", None)
        assert shipped.report() == [], grad  # no probe, no read
    monkeypatch.setattr(attention, "GATHER_MIN_WALK", 1.3)
    with interpreter_numpy_shim(), HostReads() as reads:
        sparse_choice(selection, grad=True)
    with interpreter_numpy_shim(), HostReads() as render_reads:
        assert sparse_choice(selection, grad=False) == ("gather", None)
    assert any("walk_ratio" in row["where"] for row in reads.report()), reads.report()
    assert render_reads.report() == []  # rendering does not weigh the walk


@pytest.mark.parametrize("backend", ["triton", "gather"])
def test_a_forward_reads_nothing_back(backend):
    assert forward_reads(backend) == []


@pytest.mark.parametrize("backend", ["triton", "gather"])
def test_a_training_step_reads_nothing_back(backend):
    assert training_step_reads(backend) == []


def test_the_routing_probe_reads_nothing_back():
    """The routing probe's targets and loss (training.route_targets, RouteProbe) stay on the device."""
    assert training_step_reads("triton", route_probe=True) == []
