"""Sequence parallelism (Ulysses style) over torch.distributed: one story across several processes.

For: `SequenceParallel`, the process group a transformer forward is spread over, and its four
moves: `split_tokens` (each rank keeps a contiguous slice of the tokens), `to_heads` / `to_tokens`
(the all-to-all before and after self-attention: every token for a subset of heads, and back),
`gather_tokens` (every rank gets the whole output); plus what keeps the ranks in step
(`on_rank0`: rank 0 decides, the others receive its answer; `all_reduce_sum` for statistics).
`start(device)` joins the group torchrun describes (NCCL on CUDA, gloo on the CPU).
Not for: attention itself (engine/moc runs unchanged on the local heads), sampling (every rank runs
the same sampler on the same, all-gathered, transformer output), files (rank 0 writes them) or
the jobs of an app served across the ranks (engine/ranks.py).

Why the all-to-all is our own and not diffusers' context parallelism: diffusers' hooks split the
inputs of `WanTransformer3DModel.forward` and do the all-to-all inside `dispatch_attention_fn`.
This product runs its own forward (story RoPE positions), its cross-attention indexes each shot's
token range, and self-attention is the MoC call with a context K/V cache, none of which goes
through the dispatcher; two torch.distributed calls around `story_attention` fit it exactly.

Tokens that do not divide by the world size are padded to a multiple of it (the padding rows ride
through the row-wise layers and are dropped before attention and at the gather), so any story
shards. The heads must divide by the world size: MoC routes per head, and a head is never split.
Inference only: the collectives carry no gradients.
"""

from __future__ import annotations

import datetime
import os
import pickle
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600  # a collective that waits longer than this fails instead of hanging


@dataclass(frozen=True)
class SequenceParallel:
    rank: int  # this process's index in the group
    world: int  # processes in the group
    group: object = None  # torch.distributed ProcessGroup; None = the default (world) group

    # ---- sizes --------------------------------------------------------------------------------

    def token_range(self, n: int) -> tuple[int, int]:
        """[lo, hi) of the padded token axis this rank holds (hi may pass n: padding rows)."""
        local = -(-n // self.world)
        return self.rank * local, (self.rank + 1) * local

    def heads(self, num_heads: int) -> tuple[int, int]:
        """[h0, h1) of the heads this rank attends over, or a ValueError saying what to change."""
        check_heads(num_heads, self.world)
        per = num_heads // self.world
        return self.rank * per, (self.rank + 1) * per

    # ---- moving tokens ------------------------------------------------------------------------

    def split_tokens(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's slice of x along `dim` (zero-padded to world x ceil(n / world))."""
        n = x.shape[dim]
        lo, hi = self.token_range(n)
        if hi > n:
            pad = list(x.shape)
            pad[dim] = hi - n
            x = torch.cat([x, x.new_zeros(pad)], dim=dim)
        return x.narrow(dim, lo, hi - lo).contiguous()

    def gather_tokens(self, x: torch.Tensor, n: int, dim: int = 1) -> torch.Tensor:
        """Every rank's slice of the token axis `dim`, concatenated and cut to the n real tokens."""
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim).narrow(dim, 0, n)

    def to_heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """(B, n_local, H, D) this rank's tokens, all heads -> (B, n, H / world, D) every token, this
        rank's heads (the all-to-all before attention)."""
        B, n_local, H, D = x.shape
        P = self.world
        self.heads(H)
        send = x.reshape(B, n_local, P, H // P, D).permute(2, 0, 1, 3, 4).contiguous()  # (P, B, n_local, H/P, D)
        recv = torch.empty_like(send)  # recv[r]: rank r's tokens of this rank's heads
        dist.all_to_all_single(recv, send, group=self.group)
        return recv.permute(1, 0, 2, 3, 4).reshape(B, P * n_local, H // P, D)[:, :n]

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n, H / world, D) every token, this rank's heads -> (B, n_local, H, D) this rank's
        tokens, all heads (the all-to-all after attention)."""
        B, n, Hl, D = x.shape
        P = self.world
        lo, hi = self.token_range(n)
        n_local = hi - lo
        if P * n_local > n:
            x = torch.cat([x, x.new_zeros(B, P * n_local - n, Hl, D)], dim=1)
        send = x.reshape(B, P, n_local, Hl, D).permute(1, 0, 2, 3, 4).contiguous()  # (P, B, n_local, H/P, D)
        recv = torch.empty_like(send)  # recv[r]: this rank's tokens of rank r's heads
        dist.all_to_all_single(recv, send, group=self.group)
        return recv.permute(1, 2, 0, 3, 4).reshape(B, n_local, P * Hl, D)

    # ---- keeping the ranks in step ------------------------------------------------------------

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of x over the ranks (a copy; float64 statistics travel exactly)."""
        device = "cuda" if dist.get_backend(self.group) == "nccl" else "cpu"
        y = x.to(device).clone()
        dist.all_reduce(y, group=self.group)
        return y.to(x.device)

    def all_gather_object(self, obj) -> list:
        """Every rank's `obj` (picklable), in rank order."""
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def on_rank0(self, decide):
        """Run `decide()` on rank 0 only and return its result on every rank; an exception there is
        raised on every rank (so no rank waits for a collective the others never reach)."""
        answer = [None]
        if self.rank == 0:
            try:
                answer[0] = (True, decide())
            except Exception as err:  # re-raised below, on every rank
                answer[0] = (False, sendable(err))
        answer[0] = self._broadcast(answer[0])
        ok, value = answer[0]
        if not ok:
            raise value
        return value

    def _broadcast(self, obj):
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(self.group) == "nccl" else None
        payload = [obj if self.rank == 0 else None]
        try:
            dist.broadcast_object_list(payload, src=0, group=self.group, device=device)
        except pickle.PicklingError as err:
            raise RuntimeError(f"rank 0's answer cannot be sent to the other ranks: {err}") from err
        return payload[0]


def sendable(err: Exception) -> Exception:
    """`err` if it survives pickling (what a broadcast does to it), else a RuntimeError with its text:
    an error that arrived as another (an unpickling TypeError) would put the ranks out of step."""
    try:
        back = pickle.loads(pickle.dumps(err))
    except Exception:  # any pickling failure: the text still travels
        return RuntimeError(f"{type(err).__name__}: {err}")
    return err if type(back) is type(err) and str(back) == str(err) else RuntimeError(f"{type(err).__name__}: {err}")


def check_heads(num_heads: int, world: int) -> None:
    if num_heads % world:
        divisors = [p for p in range(1, num_heads + 1) if num_heads % p == 0]
        raise ValueError(f"sequence parallelism splits the {num_heads} attention heads over {world} processes, "
                         f"which does not divide them: run with --nproc-per-node in {divisors}")


def start(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[SequenceParallel, str]:
    """Join the process group torchrun describes (its RANK / WORLD_SIZE / MASTER_ADDR variables):
    NCCL on CUDA (each process on GPU LOCAL_RANK), gloo on the CPU. Returns (the group, the device
    this process renders on)."""
    cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ValueError(f"process {local} has no GPU ({torch.cuda.device_count()} visible): "
                             "lower --nproc-per-node to the GPU count")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    else:
        device = "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return SequenceParallel(rank=dist.get_rank(), world=dist.get_world_size()), device


__all__ = ["SequenceParallel", "check_heads", "sendable", "start", "DEFAULT_TIMEOUT_S"]
