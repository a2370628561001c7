"""Sequence parallelism on the CPU: 2 gloo processes render what one process renders.

One torchrun launch (tests/engine/parallel_worker.py) renders every case; each is compared with
the same render in this process: the latents within float32 tolerance, the routing report (whose
statistics each rank records for its own head and merges) to 1e-6, the cache decisions equal.
A hang fails: the launch has a timeout and the group's collectives one of their own.
"""

import errno
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.engine import StoryEngine
from engine.events import RenderStopped
from engine.parallel import SequenceParallel, check_heads, sendable
from engine.shot_cache import ShotCache
from engine.story import StoryError
from tests.engine import parallel_worker

ROOT = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT_S = 300


def torchrun(*args, timeout: float = LAUNCH_TIMEOUT_S) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 ARGS` in the repository, killed whole on timeout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks: they share its new session
        proc.communicate()
        pytest.fail(f"torchrun {' '.join(map(str, args))} hung for {timeout} s")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="module")
def parallel_renders(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("parallel")
    proc = torchrun("tests/engine/parallel_worker.py", tiny_model_dir, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_only_rank0_writes(parallel_renders):
    assert list((parallel_renders / "rank0").rglob("story.mp4"))  # rank 0 wrote its outputs
    assert not (parallel_renders / "rank1").exists()  # no MP4s, cache, reports or folders on rank 1


def close_reports(a: dict, b: dict) -> None:
    for key in ("shot_frames", "num_layers", "num_heads", "steps", "routed_shots", "backends", "pins", "blocks"):
        assert a[key] == b[key], key
    for key in ("frame_selection", "shot_recall", "density", "frame_routed", "sparsity", "attn_flops_moc",
                "attn_flops_dense"):
        flat_a = np.array(_numbers(a[key]))
        flat_b = np.array(_numbers(b[key]))
        np.testing.assert_allclose(flat_a, flat_b, rtol=1e-6, atol=1e-6, err_msg=key)


def _numbers(x) -> list:
    if isinstance(x, dict):
        return [n for k in sorted(x) for n in _numbers(x[k])]
    if isinstance(x, list):
        return [n for v in x for n in _numbers(v)]
    return [float(x)]


CASES = list(parallel_worker.cases()) + ["shots-moc-regenerate"]


@pytest.mark.parametrize("name", CASES)
def test_two_processes_render_what_one_renders(parallel_renders, tiny_model, tmp_path, name):
    got = torch.load(parallel_renders / f"{name}.pt", weights_only=False)
    base = name.removesuffix("-regenerate")
    story, kwargs, options = parallel_worker.cases()[base]
    engine = StoryEngine(tiny_model, ShotCache(tmp_path / "shots"), tmp_path, options)
    want = parallel_worker.render(engine, story, kwargs, tmp_path / "out")
    if name.endswith("-regenerate"):
        story, kwargs = parallel_worker.regenerate_case()
        want = parallel_worker.render(engine, story, kwargs, tmp_path / "out2")
        assert want["status"] == ["cached", "generated", "cached"]  # both sides: shot 2 kept as context
    assert got["status"] == want["status"]
    for shot, (a, b) in enumerate(zip(got["latents"], want["latents"])):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"shot {shot}: {m}")
    close_reports(got["routing"], want["routing"])
    if base.endswith("moc") or "moc-" in base:
        assert got["routing"]["sparsity"] > 0  # MoC really routed (sparse) on both sides


def test_heads_that_do_not_divide_are_a_clear_error(tiny_model, tmp_path):
    with pytest.raises(ValueError, match=r"2 attention heads over 3 processes.*--nproc-per-node in \[1, 2\]"):
        StoryEngine(tiny_model, ShotCache(tmp_path / "shots"), tmp_path, parallel=SequenceParallel(rank=0, world=3))
    check_heads(12, 4)  # 1.3B: 12 heads over 4 GPUs is fine


def test_rank0_errors_reach_the_other_ranks_as_they_are():
    """on_rank0 broadcasts rank 0's error: it must unpickle as the same error (a StoryError that
    arrived as a TypeError would end the ranks differently), or travel as a RuntimeError with its text."""
    for err in (StoryError("shots[1].frames", "too long"), RenderStopped("stopped", (0, 1)),
                OSError(errno.ENOSPC, "No space left on device", "/cache/tmp")):
        assert sendable(err) is err
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err)
    assert pickle.loads(pickle.dumps(StoryError("a", "b"))).field == "a"
    assert pickle.loads(pickle.dumps(RenderStopped("x", (2,)))).finished_shots == (2,)
    sent = sendable(TwoArgumentError(1, 2))  # pickles, but unpickling calls it with one argument
    assert type(sent) is RuntimeError and str(sent) == "TwoArgumentError: 1/2"


class TwoArgumentError(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a}/{b}")


def test_token_slices_cover_every_token_once():
    for world in (1, 2, 3, 4):
        for n in (1, 2, 5, 45, 120):
            ranges = [SequenceParallel(rank=r, world=world).token_range(n) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] >= n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, no overlap
            assert len({hi - lo for lo, hi in ranges}) == 1  # equal slices: what the all-to-all needs


def test_cli_renders_across_two_processes(tiny_model_dir, tmp_path):
    story = parallel_worker.cases()["joint-moc"][0]
    path = story.save(tmp_path / "story.json")
    proc = torchrun("launch.py", "--story", path, "--out", tmp_path / "out", "--model", tiny_model_dir,
                    "--cache-dir", tmp_path / "cache", "--device", "cpu")
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[:3000]}\n...\n{proc.stderr[-2000:]}"
    assert "sequence parallel: 2 processes, 1 heads each" in proc.stdout
    assert proc.stdout.count("shot 00: generated") == 1  # rank 0 reports, the other rank is quiet
    for name in ("story.mp4", "shot_02.mp4", "routing.json", "summary.json"):
        assert (tmp_path / "out" / name).is_file()
    assert len(list((tmp_path / "cache" / "shots" / "entries").rglob("meta.json"))) == 3  # rank 0 stored the takes
