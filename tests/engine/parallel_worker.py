"""One rank of the sequence-parallel tests (tests/engine/test_parallel.py starts it with torchrun).

Renders every case of `cases()` with the tiny model folder argv[1] through a StoryEngine spread
over the torchrun group (gloo, CPU) and, on rank 0, saves each render's latents and routing
report to argv[2]/<case>.pt; the test renders the same cases in one process and compares. Every
rank is given its folder argv[2]/rank<r>; only rank 0 may write into it.
"""

import datetime
import sys
from pathlib import Path

import torch

from engine.engine import StoryEngine
from engine.model import StoryModel
from engine.parallel import start
from engine.sampler import SamplerOptions
from engine.shot_cache import ShotCache
from tests.engine.conftest import tiny_story


def cases():
    """name -> (story, render kwargs, sampler options); shot-by-shot shots are 45, 30, 45 tokens
    (odd: the token slices are padded), joint runs 120."""
    return {
        "joint-moc": (tiny_story("joint"), {}, SamplerOptions()),
        "joint-dense": (tiny_story("joint", enabled=False), {}, SamplerOptions()),
        "shots-moc": (tiny_story("shot_by_shot"), {}, SamplerOptions()),
        "shots-dense": (tiny_story("shot_by_shot", enabled=False), {}, SamplerOptions()),
        # routing on pre-RoPE keys (their own cache), the chunked backend, the per-token-timestep baseline
        "shots-moc-prerope-chunked": (tiny_story("shot_by_shot", descriptor_rope=False, backend="chunked"), {},
                                      SamplerOptions()),
        "shots-moc-no-cache": (tiny_story("shot_by_shot", frames=(2, 3, 2)), {}, SamplerOptions(context_cache=False)),
    }


def regenerate_case():
    """After "shots-moc": regenerate shot 1 with both sides as context (cached takes from rank 0)."""
    return tiny_story("shot_by_shot", seeds=(3, 11, 7)), {"regenerate": 1}


def render(engine: StoryEngine, story, kwargs: dict, out: Path) -> dict:
    """The render's latents (read back from the shot cache), statuses and routing report; a rank
    other than 0 keeps no cache, so it has its statuses and report only."""
    result = engine.render(story, out_dir=out, **kwargs)
    latents = [engine.cache.get(s.key).latents for s in result.shots] if engine.cache is not None else None
    return {"latents": latents, "status": [s.status for s in result.shots], "routing": result.routing}


def main(model_dir: str, out: str) -> None:
    parallel, device = start("cpu", timeout_s=60)
    rank_dir = Path(out) / f"rank{parallel.rank}"
    model = StoryModel.load(model_dir, device=device)
    saved = {}
    for name, (story, kwargs, options) in cases().items():
        cache = ShotCache(rank_dir / name / "shots") if parallel.rank == 0 else None  # the others keep none
        engine = StoryEngine(model, cache, rank_dir / name, options, parallel)
        saved[name] = render(engine, story, kwargs, rank_dir / name / "out")
        if name == "shots-moc":
            story, kwargs = regenerate_case()
            saved["shots-moc-regenerate"] = render(engine, story, kwargs, rank_dir / name / "out2")
    if parallel.rank == 0:
        for name, result in saved.items():
            torch.save(result, Path(out) / f"{name}.pt")
    torch.distributed.barrier(timeout=datetime.timedelta(seconds=60))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
