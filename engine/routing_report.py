"""Routing statistics: recorded while sampling, kept per shot, assembled into the story report.

For: `RoutingRecorder` (the processors hand it every Selection; it keeps, per live shot, the
query-frame x key-frame selection at a few recorded steps, the routed (top-k) picks per layer x
query frame x key frame, density per layer x head, shot recall and attention FLOPs),
`ShotRouting` (one take's statistics, stored in its shot-cache entry so a cache hit keeps its
routing) and `build_report` (the routing.json the app draws).
Not for: routing itself (engine/moc) or drawing (app/).

Report schema (routing.json):
  shot_frames [S] latent frames per shot; num_layers L; num_heads H;
  steps [recorded step indices, <= 8, evenly spaced];
  frame_selection {"all": FxF, "<step>": {"all": FxF, "<layer>": FxF}}: row i, column j = mean
      over (query token of frame i, head) of the fraction of frame j's keys it attends (forced
      links such as the own shot included; rows of a shot come from the run that made its take);
  shot_recall SxS: row a = how shot a's *routed* (not forced) selections split over shots;
  frame_routed LxFxF: layer l, row i, column j = routed (top-k, never forced: no own-shot anchor,
      no pin, no text) picks per (query token of frame i, head) that land on frame j, mean over
      the recorded steps (row sums <= top_k); routed_shots [S] bool: which shots' rows hold it
      (takes recorded before it have zero rows; engine/recall.py ranks what a shot recalled);
  density LxH; sparsity = 1 - mean density; attn_flops_moc / attn_flops_dense (the current takes'
  generation cost, QK^T + PV); plus shots (per-shot density/flops), attn_seconds and
  time_saved_estimate_s (attention time x (dense/moc - 1): what dense attention would have added
  if time scaled with FLOPs); backends {name: attention calls, summed over the runs that made the current takes (a joint run
  counts once per shot)}: which backend ran ("dense-auto":
  backend "auto" judged dense SDPA faster at this size, so MoC did not run).
The engine adds pins / blocks ([query shot, key shot] pairs) and keys (each shot's take, None where
a shot has none: what the recall pictures are read from).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from engine.moc import Selection, TokenLayout

MAX_RECORDED_STEPS = 8


def recorded_steps(steps: int) -> list[int]:
    n = min(MAX_RECORDED_STEPS, steps)
    return sorted({int(round(x)) for x in np.linspace(0, steps - 1, n)})


@dataclass
class ShotRouting:
    """One take's routing statistics (what the shot cache stores)."""

    steps: list[int]  # recorded step indices
    layout_shot_frames: list[int]  # frames of the shots of the run's layout (story order, from shot 0)
    frame_selection: np.ndarray  # (len(steps), L, f, F_layout) float32 rows of this shot's frames
    density: np.ndarray  # (L, H) float64 mean density of this shot's queries over all steps
    recall: np.ndarray  # (S_layout,) float64 share of routed selections per layout shot
    flops_moc: float  # attention FLOPs spent on this shot's queries (all steps, layers, batch)
    flops_dense: float  # the same with dense attention over the same keys
    attn_seconds: float  # wall time inside self-attention attributed to this shot
    backends: dict | None = None  # attention calls of the run per backend that ran
    routed_frames: np.ndarray | None = None  # (L, f, F_layout) float32 routed picks per (query token, head)
    #                                          of this shot's frame i on layout frame j, mean over recorded
    #                                          steps; None in takes stored before it was recorded

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"routing.frame_selection": torch.from_numpy(self.frame_selection.astype(np.float32)),
               "routing.density": torch.from_numpy(self.density.astype(np.float64)),
               "routing.recall": torch.from_numpy(self.recall.astype(np.float64))}
        if self.routed_frames is not None:
            out["routing.routed_frames"] = torch.from_numpy(self.routed_frames.astype(np.float32))
        return out

    def meta(self) -> dict:
        return {"steps": self.steps, "layout_shot_frames": self.layout_shot_frames,
                "flops_moc": self.flops_moc, "flops_dense": self.flops_dense, "attn_seconds": self.attn_seconds,
                "backends": self.backends or {}}

    @staticmethod
    def from_stored(tensors: dict, meta: dict) -> "ShotRouting":
        return ShotRouting(steps=list(meta["steps"]), layout_shot_frames=list(meta["layout_shot_frames"]),
                           frame_selection=tensors["routing.frame_selection"].numpy(),
                           density=tensors["routing.density"].numpy(), recall=tensors["routing.recall"].numpy(),
                           flops_moc=float(meta["flops_moc"]), flops_dense=float(meta["flops_dense"]),
                           attn_seconds=float(meta.get("attn_seconds", 0.0)), backends=dict(meta.get("backends", {})),
                           routed_frames=(tensors["routing.routed_frames"].numpy()
                                          if "routing.routed_frames" in tensors else None))

    @property
    def mean_density(self) -> float:
        return float(self.density.mean())


class _TimedCall(NamedTuple):
    """One attention call's time on the GPU: two recorded CUDA events (timing enabled)."""
    start: torch.cuda.Event
    end: torch.cuda.Event


class _DenseCall(NamedTuple):
    layer: int
    slot: int  # recorded-step slot, -1 off the recorded steps
    q_shape: tuple[int, int, int, int]  # (B, H, Nq, D)
    num_keys: int


class _MocCall(NamedTuple):
    layer: int
    slot: int
    shape: tuple[int, int, int, int]  # (B, H, Nq, N keys)
    head_dim: int
    stats: list  # [per-shot attended keys (S_live, H), total, routed (C, C) or None, forced or None]: device tensors until flushed
    qchunk: torch.Tensor  # (Nq,) chunk of each query token, on the host


class RoutingRecorder:
    """Accumulates statistics of one sampling run (the live shots of one layout)."""

    def __init__(self, layout: TokenLayout, live_shots: list[int], q_offset: int, num_layers: int,
                 num_heads: int, steps: int, head_range: tuple[int, int] | None = None):
        self.layout = layout
        # heads [h0, h1) of the model are the ones this process's selections cover (sequence
        # parallelism: this rank's heads; `merge` then combines the ranks)
        self.h0, self.h1 = head_range or (0, num_heads)
        self.live_shots = live_shots  # story indices of the live shots (= layout shot indices)
        self.q_offset = q_offset
        self.L, self.H = num_layers, num_heads
        self.steps = recorded_steps(steps)
        self.capture = False
        self.step_slot = -1
        lt = layout.tensors
        self.F = layout.num_frames
        C = layout.num_chunks
        is_video = ~lt.chunk_is_text
        self.chunk_frame = torch.where(is_video, lt.chunk_frame, 0)
        self.chunk_len = lt.chunk_len.double()
        self.frame_of_chunk = torch.zeros(C, self.F, dtype=torch.float64)  # (C, F) one-hot
        self.frame_of_chunk[torch.arange(C)[is_video], lt.chunk_frame[is_video]] = 1.0
        self.frame_len = self.chunk_len @ self.frame_of_chunk  # (F,) tokens per frame
        self.chunk_shot = lt.chunk_shot
        n_rec = len(self.steps)
        self.frame_sel = {s: np.zeros((n_rec, num_layers, layout.shot_frames[s], self.F)) for s in live_shots}
        self.att_sum = {s: np.zeros((num_layers, num_heads)) for s in live_shots}  # attended-key fractions summed
        self.att_n = {s: np.zeros((num_layers, 1)) for s in live_shots}  # queries (x batch) summed
        self.recall = {s: np.zeros(layout.num_shots) for s in live_shots}
        self.routed_frames = {s: np.zeros((num_layers, layout.shot_frames[s], self.F)) for s in live_shots}
        self.routed_calls = np.zeros(num_layers)  # routed calls recorded per layer (the mean's denominator)
        self.flops_moc = {s: 0.0 for s in live_shots}
        self.flops_dense = {s: 0.0 for s in live_shots}
        self.attn_seconds = {s: 0.0 for s in live_shots}
        self._last_density = 1.0
        self._total_flops_moc = 0.0  # every query of every call (context tokens included)
        self._total_flops_dense = 0.0
        self.backends: dict[str, int] = {}  # attention calls per backend that ran ("dense-auto": auto chose dense)
        # calls whose statistics still sit on the GPU: read back together by `flush`, once per forward,
        # so that recording never makes the host wait for the GPU inside a forward (a wait per layer
        # left the GPU idle while the host queued the next layer)
        self._pending: list[_TimedCall | _DenseCall | _MocCall] = []
        self.defer = False  # True: defer on the CPU too (tests of the read-back); the GPU always defers

    # ---- what the sampler and the engine read (each reads the pending calls back first) ----------

    @property
    def last_density(self) -> float:
        """Density of the last attention call recorded (1.0 for a dense one)."""
        self.flush()
        return self._last_density

    @property
    def total_flops_moc(self) -> float:
        self.flush()
        return self._total_flops_moc

    @property
    def total_flops_dense(self) -> float:
        self.flush()
        return self._total_flops_dense

    def begin_step(self, step: int) -> None:
        self.capture = step in self.steps
        self.step_slot = self.steps.index(step) if self.capture else -1

    def add_seconds(self, seconds: float) -> None:
        """Attention wall time of one forward, split over live shots by query tokens."""
        total = sum(self.layout.shot_frames[s] for s in self.live_shots)
        for s in self.live_shots:
            self.attn_seconds[s] += seconds * self.layout.shot_frames[s] / total

    def add_events(self, start, end) -> None:
        """Attention time of one call on the GPU, between two recorded CUDA events (timing
        enabled): read with the pending statistics, so the host does not wait for it."""
        self._pending.append(_TimedCall(start, end))

    def _shot_query_ranges(self):
        for s in self.live_shots:
            a, b = self.layout.shot_range(s)
            yield s, a - self.q_offset, b - self.q_offset

    def record_dense(self, layer: int, q_shape, num_keys: int, q_offset: int, backend: str = "dense") -> None:
        self.backends[backend] = self.backends.get(backend, 0) + 1
        self._pending.append(_DenseCall(layer, self.step_slot if self.capture else -1, tuple(q_shape), num_keys))
        if len(self._pending) == 1 and not self.defer:  # nothing waits on the GPU before it
            self.flush()

    def record(self, layer: int, selection: Selection, head_dim: int) -> None:
        """Count one attention call. Its statistics are reduced on the selection's device and
        read back by `flush` (at once on the CPU)."""
        B, H, Nq = selection.shape
        name = str(selection.info.get("backend", "?"))
        self.backends[name] = self.backends.get(name, 0) + 1
        attended = selection.attended_keys()  # (B, H, Nq) float64, on the device
        ranges = list(self._shot_query_ranges())
        # reduce on the device: only (shots, H) numbers (and at recorded steps the (C, C) counts) come back
        per_shot = torch.stack([attended[:, :, a:b].sum(dim=(0, 2)) for _, a, b in ranges])  # (S_live, H)
        total = attended.sum()
        routed = forced = None
        if self.capture:
            routed = selection.chunk_counts(host=False).double().sum(0)  # (C, C) over heads
            forced = selection.forced_host if selection.forced_host is not None else selection.forced
        qchunk = selection.layout.tensors.token_chunk[selection.q_offset:selection.q_offset + Nq]  # host
        self._pending.append(_MocCall(layer, self.step_slot if self.capture else -1, (B, H, Nq, selection.num_keys),
                                      head_dim, [per_shot, total, routed, forced], qchunk))
        if not per_shot.is_cuda and not self.defer:
            self.flush()

    def flush(self) -> None:
        """Read every pending call's statistics back from the GPU in one copy and add them up."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        calls = [p for p in pending if isinstance(p, _MocCall)]
        on_gpu = [t for p in calls for t in p.stats if t is not None and t.is_cuda]
        if on_gpu:
            flat = torch.cat([t.reshape(-1).double() for t in on_gpu]).cpu()  # the one wait
            parts = iter(flat.split([t.numel() for t in on_gpu]))
            for p in calls:
                p.stats[:] = [t if t is None or not t.is_cuda else next(parts).view(t.shape) for t in p.stats]
        for p in pending:
            if isinstance(p, _TimedCall):
                p.end.synchronize()
                self.add_seconds(p.start.elapsed_time(p.end) / 1e3)
            elif isinstance(p, _DenseCall):
                self._add_dense(*p)
            else:
                self._add_moc(*p)

    def _add_dense(self, layer: int, slot: int, q_shape, num_keys: int) -> None:
        B, H, Nq, D = q_shape
        self._total_flops_moc += float(B * H * Nq * num_keys * 4 * D)
        self._total_flops_dense += float(B * H * Nq * num_keys * 4 * D)
        for s, a, b in self._shot_query_ranges():
            self.att_sum[s][layer, self.h0:self.h1] += B * (b - a)
            self.att_n[s][layer] += B * (b - a)
            f = float(B * H * (b - a) * num_keys * 4 * D)
            self.flops_moc[s] += f
            self.flops_dense[s] += f
            if slot >= 0:
                self.frame_sel[s][slot, layer] = 1.0
        self._last_density = 1.0

    def _add_moc(self, layer: int, slot: int, shape, head_dim: int, stats, qchunk: torch.Tensor) -> None:
        B, H, Nq, N = shape
        per_shot, total, routed, forced = stats
        total = float(total)
        self._total_flops_moc += total * 4 * head_dim
        self._total_flops_dense += float(B * H * Nq * N) * 4 * head_dim
        for (s, a, b), row in zip(self._shot_query_ranges(), per_shot):
            self.att_sum[s][layer, self.h0:self.h1] += (row / N).numpy()
            self.att_n[s][layer] += B * (b - a)
            self.flops_moc[s] += float(row.sum()) * 4 * head_dim
            self.flops_dense[s] += float(B * H * (b - a) * N) * 4 * head_dim
        self._last_density = total / (B * H * Nq * N)
        if slot < 0:
            return
        forced = forced.double()
        q_tokens = torch.bincount(qchunk, minlength=self.layout.num_chunks).double()  # (C,) query tokens per chunk
        pairs = routed / B + H * forced * q_tokens[:, None]  # (C, C) (token, head) pairs attending chunk j
        covered = pairs * self.chunk_len[None, :]  # weight by key-chunk length: keys attended
        frame_pairs = self.frame_of_chunk.T @ covered @ self.frame_of_chunk  # (F, F)
        q_frame_tokens = self.frame_of_chunk.T @ q_tokens  # (F,)
        denom = (H * q_frame_tokens)[:, None] * self.frame_len[None, :]
        frac = torch.where(denom > 0, frame_pairs / denom.clamp(min=1), 0.0).numpy()
        # routed picks only (forced links are not in `routed`), per (query token, head, batch entry)
        routed_frames = self.frame_of_chunk.T @ routed @ self.frame_of_chunk  # (F, F)
        per_query = (B * H * q_frame_tokens)[:, None]
        picks = torch.where(per_query > 0, routed_frames / per_query.clamp(min=1), 0.0).numpy()
        self.routed_calls[layer] += 1
        by_key_shot = torch.zeros(self.layout.num_chunks, self.layout.num_shots, dtype=torch.float64)
        video = self.chunk_shot >= 0
        by_key_shot[torch.arange(self.layout.num_chunks)[video], self.chunk_shot[video]] = 1.0
        routed_by_shot = routed @ by_key_shot  # (C, S)
        for s, _, _ in self._shot_query_ranges():
            f0, f1 = self.layout.shot_frame_range(s)
            self.frame_sel[s][slot, layer] = frac[f0:f1]
            self.routed_frames[s][layer] += picks[f0:f1]
            rows = (self.chunk_shot == s)
            self.recall[s] += routed_by_shot[rows].sum(0).numpy()

    def merge(self, parallel) -> None:
        """Combine the statistics of every rank of a sequence-parallel run (each rank recorded its
        own heads), on every rank, so that each holds the whole run's: densities and counts are
        summed, per-(query, head) means averaged over the ranks (each holds as many heads), and
        a backend's calls counted once per call (a fraction where the ranks' heads ran different
        backends). Every rank must call it, once, after the run."""
        self.flush()
        live = self.live_shots
        parts = ([self.att_sum[s] for s in live] + [self.recall[s] for s in live]
                 + [np.array([self.flops_moc[s], self.flops_dense[s]]) for s in live]
                 + [np.array([self.total_flops_moc, self.total_flops_dense])])
        means = [self.frame_sel[s] for s in live] + [self.routed_frames[s] for s in live]
        flat = np.concatenate([a.ravel() for a in parts] + [a.ravel() / parallel.world for a in means])
        flat = parallel.all_reduce_sum(torch.from_numpy(flat)).numpy()
        pos = 0
        for a in parts + means:  # every part and mean back in place, in the order sent
            a[...] = flat[pos:pos + a.size].reshape(a.shape)
            pos += a.size
        for i, s in enumerate(live):
            self.flops_moc[s], self.flops_dense[s] = (float(x) for x in parts[2 * len(live) + i])
        self._total_flops_moc, self._total_flops_dense = (float(x) for x in parts[-1])
        calls: dict[str, float] = {}
        for backends in parallel.all_gather_object(self.backends):
            for name, n in backends.items():
                calls[name] = calls.get(name, 0) + n / parallel.world
        self.backends = {name: int(n) if float(n).is_integer() else round(n, 3) for name, n in calls.items()}

    def shot_routing(self, shot: int) -> ShotRouting:
        self.flush()
        recall = self.recall[shot]
        total = recall.sum()
        return ShotRouting(steps=list(self.steps),
                           layout_shot_frames=list(self.layout.shot_frames),
                           frame_selection=self.frame_sel[shot].astype(np.float32),
                           density=self.att_sum[shot] / np.maximum(self.att_n[shot], 1),
                           recall=recall / total if total > 0 else recall,
                           flops_moc=self.flops_moc[shot], flops_dense=self.flops_dense[shot],
                           attn_seconds=self.attn_seconds[shot], backends=dict(self.backends),
                           routed_frames=(self.routed_frames[shot]
                                          / np.maximum(self.routed_calls, 1)[:, None, None]).astype(np.float32))


def build_report(shot_frames: list[int], takes: list[ShotRouting | None], num_layers: int,
                 num_heads: int, steps: list[int], decimals: int = 4) -> dict:
    """The story's routing report from the routing of each shot's current take."""
    S, F, L, H = len(shot_frames), sum(shot_frames), num_layers, num_heads
    starts = np.concatenate([[0], np.cumsum(shot_frames)]).astype(int)
    sel = np.zeros((len(steps), L, F, F))
    recall = np.zeros((S, S))
    routed = np.zeros((L, F, F))
    routed_shots = [False] * S
    density_sum, tokens = np.zeros((L, H)), 0.0
    flops_moc = flops_dense = attn_seconds = 0.0
    per_shot = []
    backends: dict[str, int] = {}
    for s, take in enumerate(takes):
        if take is None:
            per_shot.append(None)
            continue
        f0, f1 = starts[s], starts[s + 1]
        col = 0
        for j, nf in enumerate(take.layout_shot_frames):
            # place columns of layout shot j where the story's shot j has the same length
            if j < S and shot_frames[j] == nf and take.frame_selection.shape[2] == f1 - f0:
                for si, step in enumerate(steps):
                    if step in take.steps:
                        ti = take.steps.index(step)
                        sel[si, :, f0:f1, starts[j]:starts[j + 1]] = take.frame_selection[ti, :, :, col:col + nf]
                if take.routed_frames is not None and take.routed_frames.shape[0] == L:
                    routed[:, f0:f1, starts[j]:starts[j + 1]] = take.routed_frames[:, :, col:col + nf]
                    routed_shots[s] = True
            col += nf
        n = min(S, len(take.recall))
        recall[s, :n] = take.recall[:n]
        density_sum += take.density * (f1 - f0)
        tokens += f1 - f0
        flops_moc += take.flops_moc
        flops_dense += take.flops_dense
        attn_seconds += take.attn_seconds
        for name, calls in (take.backends or {}).items():
            backends[name] = backends.get(name, 0) + calls
        per_shot.append({"density": round(take.mean_density, decimals), "attn_flops_moc": take.flops_moc,
                         "attn_flops_dense": take.flops_dense})
    r = lambda a: np.round(a, decimals).tolist()  # noqa: E731
    density = density_sum / max(tokens, 1)
    frame_selection = {"all": r(sel.mean(axis=(0, 1))) if len(steps) else r(np.zeros((F, F)))}
    for si, step in enumerate(steps):
        entry = {"all": r(sel[si].mean(axis=0))}
        for layer in range(L):
            entry[str(layer)] = r(sel[si, layer])
        frame_selection[str(step)] = entry
    ratio = flops_dense / flops_moc if flops_moc > 0 else 1.0
    return {
        "shot_frames": list(map(int, shot_frames)), "num_layers": L, "num_heads": H, "steps": list(steps),
        "frame_selection": frame_selection, "shot_recall": r(recall), "density": r(density),
        "frame_routed": r(routed), "routed_shots": routed_shots,
        "sparsity": round(float(1 - density.mean()), decimals) if tokens else 0.0,
        "attn_flops_moc": flops_moc, "attn_flops_dense": flops_dense,
        "attn_seconds": round(attn_seconds, 4),
        "time_saved_estimate_s": round(attn_seconds * (ratio - 1), 4),
        "shots": per_shot,
        "backends": backends,
    }


__all__ = ["RoutingRecorder", "ShotRouting", "build_report", "recorded_steps", "MAX_RECORDED_STEPS"]
