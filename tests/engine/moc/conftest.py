"""Shared helpers for the MoC tests: random layouts, naive specifications, the interpreter patch."""

import torch

from engine.moc import MoCConfig, TokenLayout, forced_links
from engine.moc.interpret import interpreter_numpy_shim  # noqa: F401  (the MoC tests import it from here)


def random_layout(gen: torch.Generator, *, text: bool = False, chunking: str = "frame") -> TokenLayout:
    """A small layout with odd sizes: 1-4 shots of 1-4 frames of 3-23 tokens."""
    def randint(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    shots = tuple(randint(1, 4) for _ in range(randint(1, 4)))
    text_tokens, text_shots = (), ()
    if text:
        text_shots = (-1,) + tuple(range(len(shots)))
        text_tokens = tuple(randint(1, 7) for _ in text_shots)
    chunk_size = randint(2, 9) if chunking != "frame" else 0
    return TokenLayout(frame_tokens=randint(3, 23), shot_frames=shots, text_tokens=text_tokens,
                       text_shots=text_shots, chunking=chunking, chunk_size=chunk_size)


def naive_routing_mask(q, k, layout: TokenLayout, config: MoCConfig, q_offset: int = 0) -> torch.Tensor:
    """Token-by-token restatement of the routing rules: (B, H, Nq, C) bool, one python loop per
    token and head, so that it shares no code path with routing.route."""
    chunks = layout.chunks
    C = len(chunks)
    forced = forced_links(layout, config)
    B, H, Nq, D = q.shape
    out = torch.zeros(B, H, Nq, C, dtype=torch.bool)
    desc = torch.stack([k[:, :, s:e].double().mean(2) for s, e, *_ in chunks], dim=2)  # (B, H, C, D)
    token_chunk = [next(c for c, (s, e, *_) in enumerate(chunks) if s <= t < e) for t in range(layout.num_tokens)]
    for b in range(B):
        for h in range(H):
            for t in range(Nq):
                i = token_chunk[q_offset + t]
                cands = [j for j in range(C) if not forced[i, j] and (not config.causal or j < i)]
                scores = {j: float(q[b, h, t].double() @ desc[b, h, j]) for j in cands}
                best = sorted(cands, key=lambda j: -scores[j])[:config.top_k]
                for j in range(C):
                    out[b, h, t, j] = bool(forced[i, j]) or j in best
    return out

