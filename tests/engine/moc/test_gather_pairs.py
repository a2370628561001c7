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


def test_sorted_by_counts_and_orders_like_a_stable_sort_at_both_id_widths():
    """_sorted_by sorts on int16 or int32 ids by how many groups there are, and counts by
    binary search: the same order as a stable int64 argsort and the same counts as a histogram,
    with the spare group (`groups`, none) last and uncounted."""
    from engine.moc.triton_gather import _sorted_by
    g = torch.Generator().manual_seed(2)
    for groups in (5, 32_767, 40_000):  # int16 ids (up to its largest), int32 ids
        used = torch.tensor([0, 1, groups // 2, groups - 1, groups])  # a few ids spread over the range
        key = used[torch.randint(0, len(used), (3, 211), generator=g)]
        order, counts, start = _sorted_by(key, groups)
        assert torch.equal(order, key.argsort(dim=-1, stable=True))
        for row in range(key.shape[0]):
            for gid in used[:-1].tolist():
                want = int((key[row] == gid).sum())
                assert int(counts[row, gid]) == want
                assert int(start[row, gid]) == int((key[row] < gid).sum())
            assert int(counts[row].sum()) == int((key[row] < groups).sum())


def test_gather_work_is_the_density_with_one_row_tiles_and_adds_each_chunks_padding():
    """benchmarks/attention.py's `work` for gather: with BLOCK_M = 1 nothing is padded, so it is the
    density; with 4-row tiles every (slot, chunk) group of query rows rounds up to whole tiles,
    counted here by hand."""
    import pytest

    from engine.moc import MoCConfig, TokenLayout
    from engine.moc.routing import route
    from engine.moc.triton_gather import gather_work
    layout = TokenLayout(frame_tokens=7, shot_frames=(3, 2, 4), text_tokens=(5, 3), text_shots=(-1, 1))
    g = torch.Generator().manual_seed(4)
    B, H, D = 2, 3, 8
    q, k = (torch.randn(B, H, layout.num_tokens, D, generator=g) for _ in range(2))
    sel = route(q, k, layout, MoCConfig(top_k=2))
    assert gather_work(sel, 1) == pytest.approx(sel.density(), rel=1e-12)
    clen = layout.tensors.chunk_len.tolist()
    forced = float((sel.forced.double() @ layout.tensors.chunk_len.double())[sel.query_chunks].sum()) * B * H
    padded = 0
    for b in range(B):
        for h in range(H):
            for r in range(sel.routed.shape[-1]):
                for c in range(layout.num_chunks):
                    rows = int((sel.routed[b, h, :, r] == c).sum())
                    padded += -(-rows // 4) * 4 * clen[c]
    want = (forced + padded) / (B * H * layout.num_tokens * layout.num_tokens)
    assert gather_work(sel, 4) == pytest.approx(want, rel=1e-12)
    assert gather_work(sel, 4) > sel.density()
