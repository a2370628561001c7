"""MoC attention: one entry point, several backends that consume the same Selection.

For: `moc_attention(q, k, v, selection, backend=...)`, the readable float32 reference (the
specification every fast path is tested against), and dispatch by name.
Not for: routing (routing.py) or backend internals (flex.py, triton_attention.py).

Backends:
  "reference": masked softmax attention in float32, query tile by query tile; CPU and GPU; autograd.
  "flex":      FlexAttention with a BlockMask built from the selection (flex.py).
  "triton":    fused block-sparse flash attention over the selection (GPU only).
  "dense":     the selection as a boolean mask through SDPA (exact; for debugging and as a floor).
  "auto":      "triton" on CUDA when it is importable, else "reference"; the choice is recorded
               in selection.info["backend"] and in the routing statistics.
An unavailable backend raises; nothing is swapped silently.
"""

from __future__ import annotations

import torch

from .selection import Selection

BACKENDS = ("auto", "reference", "flex", "triton", "dense")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selection: Selection) -> None:
    B, H, Nq = selection.shape
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, N, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if tuple(q.shape[:3]) != (B, H, Nq):
        raise ValueError(f"q must be (B={B}, H={H}, Nq={Nq}, D) to match the selection, got {tuple(q.shape)}")
    if tuple(k.shape[:3]) != (B, H, selection.num_keys) or k.shape != v.shape:
        raise ValueError(f"k and v must both be (B={B}, H={H}, N={selection.num_keys}, D={q.shape[3]}); "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"q and k must share the head dim, got {q.shape[3]} and {k.shape[3]}")


def reference_attention(q, k, v, selection: Selection, scale: float | None = None,
                        block: int = 1024) -> torch.Tensor:
    """The specification: softmax(q k^T * scale, masked to the selection) v, in float32.
    Works in query blocks so the (Nq, N) score matrix never exists whole."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    token_chunk = selection.layout.tensors.token_chunk.to(q.device)  # (N,)
    mask = selection.token_mask()  # (B, H, Nq, C)
    out = []
    for t0 in range(0, q.shape[2], block):
        t1 = min(t0 + block, q.shape[2])
        allowed = mask[:, :, t0:t1][..., token_chunk]  # (B, H, T, N)
        s = torch.einsum("bhtd,bhnd->bhtn", q[:, :, t0:t1].float(), k.float()) * scale
        p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
        out.append(torch.einsum("bhtn,bhnd->bhtd", p, v.float()))
    return torch.cat(out, dim=2).to(q.dtype)


def dense_masked_attention(q, k, v, selection: Selection, scale: float | None = None) -> torch.Tensor:
    """The selection as an explicit boolean mask through SDPA (memory O(Nq * N))."""
    mask = selection.token_mask()[..., selection.layout.tensors.token_chunk.to(q.device)]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def triton_available() -> tuple[bool, str]:
    """(available, reason) for the fused Triton backend."""
    if not torch.cuda.is_available():
        return False, "the Triton backend needs a CUDA GPU and none is visible"
    try:
        from . import triton_attention  # noqa: F401
    except ImportError as err:
        return False, f"the Triton backend could not be imported: {err}"
    return True, ""


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        ok, _ = triton_available()
        return "triton" if ok and device.type == "cuda" else "reference"
    if backend == "triton":
        ok, why = triton_available()
        if not ok:
            raise ValueError(f"backend='triton' is unavailable: {why}; use backend='reference' or 'flex'")
    return backend


def moc_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selection: Selection, *,
                  backend: str = "auto", scale: float | None = None) -> torch.Tensor:
    """Attention of q (B, H, Nq, D) over k, v (B, H, N, D) restricted to `selection`.
    Returns (B, H, Nq, D) in q's dtype."""
    check_qkv(q, k, v, selection)
    name = resolve_backend(backend, q.device)
    selection.info["backend"] = name
    if name == "reference":
        return reference_attention(q, k, v, selection, scale)
    if name == "dense":
        return dense_masked_attention(q, k, v, selection, scale)
    if name == "flex":
        from .flex import flex_moc_attention
        return flex_moc_attention(q, k, v, selection, scale)
    from .triton_attention import triton_moc_attention
    return triton_moc_attention(q, k, v, selection, scale)
