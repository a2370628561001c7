"""routed_pairs (backend "gather"'s work list) on the CPU, no kernels: every routed (query, slot)
appears once, grouped by chunk with queries ascending, and the tile counts cover the pairs."""

import torch

from engine.moc.triton_gather import routed_pairs


def test_pairs_group_every_routed_slot_by_chunk():
    g = torch.Generator().manual_seed(0)
    B, H, Nq, R, C, block = 2, 3, 37, 4, 9, 8
    routed = torch.randint(-1, C, (B, H, Nq, R), generator=g, dtype=torch.int32)
    pairs = routed_pairs(routed, C, block)
    flat = routed.reshape(B * H, Nq * R)
    for bh in range(B * H):
        total = 0
        for c in range(C):
            start, count = int(pairs.start[bh, c]), int(pairs.count[bh, c])
            slots = pairs.slot[bh, start:start + count].long()
            queries = pairs.query[bh, start:start + count].long()
            want = (flat[bh] == c).nonzero().squeeze(1)
            assert torch.equal(slots, want)  # exactly the slots routed to c, in query order
            assert torch.equal(queries, want // R)
            total += count
        assert total == int((flat[bh] >= 0).sum())
        tiles = (pairs.count[bh].long() + block - 1) // block
        assert torch.equal(pairs.tile_end[bh].long(), tiles.cumsum(0))
