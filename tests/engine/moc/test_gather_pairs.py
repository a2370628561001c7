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


def test_slot_pairs_group_each_slot_by_chunk_with_each_query_once():
    """The backward's dQ work list: per slot, exactly that slot's routed queries grouped by chunk
    (queries ascending), so a query appears at most once per slot (its launch owns its row), and
    the tiles of each slot count from zero."""
    from engine.moc.triton_gather import slot_pairs
    g = torch.Generator().manual_seed(1)
    B, H, Nq, R, C, block = 2, 2, 29, 3, 7, 4
    routed = torch.randint(-1, C, (B, H, Nq, R), generator=g, dtype=torch.int32)
    pairs = slot_pairs(routed, C, block)
    flat = routed.reshape(B * H, Nq, R)
    for bh in range(B * H):
        seen = 0
        for r in range(R):
            for c in range(C):
                start, count = int(pairs.start[r, bh, c]), int(pairs.count[r, bh, c])
                queries = pairs.query[bh, start:start + count].long()
                assert torch.equal(queries, (flat[bh, :, r] == c).nonzero().squeeze(1))
                seen += count
            rows = torch.cat([pairs.query[bh, int(pairs.start[r, bh, c]):int(pairs.start[r, bh, c] + pairs.count[r, bh, c])]
                              for c in range(C)])
            assert rows.unique().numel() == rows.numel()  # one pair per query in a slot
            tiles = (pairs.count[r, bh].long() + block - 1) // block
            assert torch.equal(pairs.tile_end[r, bh].long(), tiles.cumsum(0))
            assert pairs.start[r].is_contiguous() and pairs.tile_end[r].is_contiguous()
        assert seen == int((flat[bh] >= 0).sum())
