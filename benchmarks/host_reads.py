"""Where the MoC path would make the host wait for the GPU, found on the CPU.

On a GPU, an op that reads a device value back to the host (`.item()`, `bool(t)`, `.tolist()`,
`nonzero`, a boolean-mask index, `repeat_interleave` without `output_size`, ...) blocks the host
until every queued kernel has run: the GPU then idles while the host catches up. The GPU finds
them with `torch.cuda.set_sync_debug_mode` (benchmarks/forward_gaps.py); this finds them on any
machine, by recording those ops while the GPU backends run on the CPU under the Triton interpreter
(tiny sizes), with the call site of each. It is the check `tests/engine/moc/test_host_reads.py`
runs in CI, so that a new read on the device path shows up before a GPU run does.

On the CPU every tensor is a host tensor, so reads of tensors that stay on the host by design are
not waits; these functions hold only such tensors and are left out (HOST_SIDE):
  TokenLayout.memo      computed once per layout, on the layout's host tensors;
  forced_groups         reads Selection.forced_host, the host copy of the forced links;
  make_cross_plan       the captions' validity mask, built on the host before one copy.
What this cannot see: host-to-device copies from pageable memory (`torch.tensor(..., device=
"cuda")`), which also wait, and reads in branches that run only on CUDA tensors.

    TRITON_INTERPRET=1 python benchmarks/host_reads.py [--json OUT.json]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import os
import sys
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# aten ops that read a device value back (always, or in the form noted in `_reads`)
READING_OPS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
               "aten.repeat_interleave.Tensor", "aten.is_nonzero.default", "aten.equal.default",
               "aten.allclose.default", "aten.bincount.default", "aten._unique2.default",
               "aten.unique_consecutive.default", "aten.unique_dim.default", "aten.argwhere.default"}
MASK_INDEXING_OPS = ("aten.index.Tensor", "aten.index_put")  # with a boolean index: a nonzero inside
READING_METHODS = ("tolist", "numpy", "__array__")  # host conversions the dispatcher does not see on the CPU
HOST_SIDE = ("memo", "forced_groups", "make_cross_plan")  # functions that hold host tensors only (see above)


class HostReads(TorchDispatchMode):
    """Inside `with HostReads() as reads:`, every op that would wait for the GPU, counted by
    (what, where): where is the innermost project frames of its stack, innermost first."""

    def __init__(self):
        super().__init__()
        self.sites: collections.Counter = collections.Counter()
        self._methods: dict = {}

    def __enter__(self):
        for name in READING_METHODS:
            original = getattr(torch.Tensor, name)
            self._methods[name] = original

            def method(tensor, *args, _name=name, _original=original, **kwargs):
                self._record(f"Tensor.{_name}")
                return _original(tensor, *args, **kwargs)
            setattr(torch.Tensor, name, method)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._methods.items():
            setattr(torch.Tensor, name, original)
        self._methods = {}
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if name in READING_OPS and not (name == "aten.repeat_interleave.Tensor" and kwargs.get("output_size")):
            self._record(name)
        elif name.startswith(MASK_INDEXING_OPS) and any(
                i is not None and i.dtype == torch.bool for i in args[1]):
            self._record(f"{name} (boolean index)")
        return func(*args, **kwargs)

    def _record(self, what: str) -> None:
        stack = traceback.extract_stack()[:-2]
        if any("triton/runtime/interpreter" in f.filename for f in stack):
            return  # the interpreter's own copies (a GPU launch reads nothing back)
        if any(f.name in HOST_SIDE for f in stack):
            return
        own = [f for f in stack if f.filename.startswith(str(ROOT)) and f.filename != __file__]
        where = " < ".join(f"{Path(f.filename).relative_to(ROOT)}:{f.lineno} {f.name}" for f in reversed(own[-3:]))
        self.sites[(what, where)] += 1

    def report(self) -> list[dict]:
        return [{"op": what, "where": where, "count": n} for (what, where), n in self.sites.most_common()]


TINY_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4,
                text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads")


@contextlib.contextmanager
def fused_routing():
    """Routing as it runs on the GPU: the fused Triton kernels (on the CPU "auto" takes the reference)."""
    import engine.moc.attention as attention
    from engine.moc import routing
    original = attention.route
    attention.route = functools.partial(routing.route, impl="triton")
    try:
        yield
    finally:
        attention.route = original


def tiny_transformer(seed: int = 0):
    from diffusers import WanTransformer3DModel
    from engine.backbone import StoryTransformer
    torch.manual_seed(seed)
    return StoryTransformer(WanTransformer3DModel(**TINY_WAN).half())


def training_step_reads(backend: str, seed: int = 0, route_probe: bool = False) -> list[dict]:
    """Reads of one training step (forward and backward, routing with drop-off / drop-in) of the
    tiny Wan transformer on 2 stories of 3 shots of 2 frames, with `backend` ("triton", "gather");
    route_probe: with the routing probe's loss (training.RouteProbe) on random look labels."""
    from engine.moc import MoCConfig
    from engine.moc.interpret import interpreter_numpy_shim
    from engine.training import RouteProbe, StoryBatch, TrainingConfig, training_loss
    tr = tiny_transformer(seed)
    tr.model.train()
    g = torch.Generator().manual_seed(seed)
    stories, shots, frames = 2, 3, 2
    latents = torch.randn(stories, 4, shots * frames, 8, 12, generator=g)
    text = [[torch.randn(5, 32, generator=g) for _ in range(shots + 1)] for _ in range(stories)]
    config = TrainingConfig(moc=MoCConfig(top_k=2, tile=16), backend=backend, route_weight=0.5 if route_probe else 0.0)
    look = None
    if route_probe:
        shape = torch.randint(0, 3, (stories, shots * frames, 4, 6), generator=g)  # 4 x 6 tokens a frame
        look = (shape, torch.rand(stories, shots * frames, 4, 6, 3, generator=g) * (shape > 0)[..., None])
    with interpreter_numpy_shim(), fused_routing(), HostReads() as reads:
        loss = training_loss(tr, StoryBatch(latents, (frames,) * shots, text, look=look), config,
                             generator=torch.Generator().manual_seed(seed + 1),
                             route_probe=RouteProbe() if route_probe else None)
        loss.backward()
    return reads.report()


def forward_reads(backend: str, seed: int = 0) -> list[dict]:
    """Reads of one inference forward of the tiny Wan transformer on a 3-shot story (shots at
    different noise levels, captions per shot), with `backend`."""
    from benchmarks.wan_forward import forward
    from engine.backbone import make_cross_plan
    from engine.moc import MoCConfig, TokenLayout
    from engine.moc.interpret import interpreter_numpy_shim
    tr = tiny_transformer(seed)
    tr.model.eval()
    g = torch.Generator().manual_seed(seed)
    shots, frames, h, w = 3, 2, 8, 12
    layout = TokenLayout(frame_tokens=tr.frame_tokens(h, w), shot_frames=(frames,) * shots)
    latents = torch.randn(1, 4, shots * frames, h, w, generator=g).half()
    timestep = (900.0 - 300.0 * (torch.arange(layout.num_tokens) // (frames * layout.frame_tokens))).float()[None]
    segments = [[torch.randn(5 + s, 32, generator=g).half() for s in range(shots + 1)]]
    text, cross = make_cross_plan(segments, [(*layout.shot_range(s), s) for s in range(shots)], "cpu")
    with interpreter_numpy_shim(), fused_routing(), HostReads() as reads:
        forward(tr, layout, latents, timestep, text, cross, tr.rotary(0, shots * frames, h, w, "cpu"),
                MoCConfig(top_k=2, tile=16), backend)
    return reads.report()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run it under the Triton interpreter: TRITON_INTERPRET=1 python benchmarks/host_reads.py")
    result = {"note": "ops that would make the host wait for the GPU, per path (tiny sizes, CPU interpreter)",
              "host_side": list(HOST_SIDE), "paths": {}}
    print(f"{'path':28} {'reads':>5}  where")
    for backend in ("triton", "gather"):
        for name, fn in ((f"forward, {backend}", forward_reads), (f"training step, {backend}", training_step_reads)):
            rows = fn(backend)
            result["paths"][name] = rows
            print(f"{name:28} {sum(r['count'] for r in rows):>5}  "
                  + ("; ".join(f"{r['count']}x {r['op']} at {r['where']}" for r in rows) or "-"))
    name = "training step, triton, routing probe"
    rows = result["paths"][name] = training_step_reads("triton", route_probe=True)
    print(f"{name:28} {sum(r['count'] for r in rows):>5}  "
          + ("; ".join(f"{r['count']}x {r['op']} at {r['where']}" for r in rows) or "-"))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
