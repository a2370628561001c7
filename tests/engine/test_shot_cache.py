"""Shot cache: round trip, atomic writes (a killed writer leaves no entry), LRU cap, two processes."""

import multiprocessing as mp
import os
import time

import pytest
import torch

from engine.shot_cache import STALE_TMP_SECONDS, ShotCache, Take


def take(key: str, frames: int = 3, fill: int = 1) -> Take:
    return Take(key=key, frames=torch.full((frames, 8, 6, 3), fill, dtype=torch.uint8),
                latents=torch.randn(3, frames, 2, 3), meta={"seed": fill},
                tensors={"routing.density": torch.rand(2, 2, dtype=torch.float64)})


def test_round_trip_and_counts(tmp_path):
    cache = ShotCache(tmp_path)
    assert cache.get("ab12") is None
    t = take("ab12")
    cache.put(t)
    got = cache.get("ab12")
    assert torch.equal(got.frames, t.frames) and torch.equal(got.latents, t.latents)
    assert torch.equal(got.tensors["routing.density"], t.tensors["routing.density"])
    assert got.meta["seed"] == 1 and got.meta["key"] == "ab12"
    s = cache.stats()
    assert (s.hits, s.misses, s.entries) == (1, 1, 1) and s.bytes > 0
    # survives a restart
    again = ShotCache(tmp_path)
    assert again.contains("ab12") and again.get("ab12") is not None


def test_put_is_idempotent_and_invalidate(tmp_path):
    cache = ShotCache(tmp_path)
    cache.put(take("cd34", fill=1))
    cache.put(take("cd34", fill=2))  # same key: the first stays
    assert cache.get("cd34").meta["seed"] == 1
    assert cache.invalidate("cd34") and not cache.contains("cd34") and not cache.invalidate("cd34")


def test_a_take_keeps_its_video_and_loses_it_with_the_take(tmp_path):
    """put_video copies an MP4 into the take's entry (one per fps), counted in the cache's bytes and
    removed with the entry; a take without one still loads, and a missing take keeps none."""
    cache = ShotCache(tmp_path / "cache")
    cache.put(take("ab12"))
    assert cache.video("ab12", 8) is None and cache.get("ab12") is not None  # a take without a video
    size = cache.stats().bytes
    mp4 = tmp_path / "shot.mp4"
    mp4.write_bytes(b"an mp4's bytes" * 10)
    assert cache.put_video("ab12", mp4, 8)
    kept = cache.video("ab12", 8)
    assert kept.read_bytes() == mp4.read_bytes() and kept.parent == cache._entry("ab12")
    assert cache.video("ab12", 4) is None  # another fps is another video
    assert cache.stats().bytes == size + 140
    mp4.write_bytes(b"changed")  # the cache keeps a copy, not the file handed to it
    assert cache.video("ab12", 8).read_bytes() == b"an mp4's bytes" * 10
    assert not cache.put_video("cd34", mp4, 8) and cache.video("cd34", 8) is None  # no take: no video
    assert not list((cache.root / "tmp").iterdir())
    assert cache.invalidate("ab12") and not kept.exists() and cache.video("ab12", 8) is None
    cache.put(take("ab12"))
    assert cache.video("ab12", 8) is None
    (cache._entry("ab12") / "video_8fps.mp4").symlink_to(mp4)  # planted: never served
    assert cache.video("ab12", 8) is None


def test_bad_keys_are_rejected(tmp_path):
    cache = ShotCache(tmp_path)
    for key in ("../x", "", "AB", "a/b"):
        with pytest.raises(ValueError):
            cache.get(key)


def _killed_writer(root: str) -> None:
    """Stage a take, then die (SIGKILL-like) before the rename that publishes it."""
    cache = ShotCache(root)
    real_rename = os.rename

    def die(src, dst):
        os._exit(9)

    os.rename = die
    try:
        cache.put(take("ee55"))
    finally:
        os.rename = real_rename


def test_killed_writer_leaves_no_entry(tmp_path):
    proc = mp.get_context("fork").Process(target=_killed_writer, args=(str(tmp_path),))
    proc.start()
    proc.join(30)
    assert proc.exitcode == 9
    cache = ShotCache(tmp_path)
    assert not cache.contains("ee55") and cache.get("ee55") is None
    leftovers = list((tmp_path / "tmp").iterdir())
    assert leftovers  # the staged folder is there, invisible to readers
    old = time.time() - STALE_TMP_SECONDS - 10
    for p in leftovers:
        os.utime(p, (old, old))
    ShotCache(tmp_path)  # a new cache cleans staging left by killed writers
    assert not list((tmp_path / "tmp").iterdir())
    cache.put(take("ee55"))
    assert cache.get("ee55") is not None


def _killed_video_writer(root: str, mp4: str) -> None:
    """Stage a take's video, then die before the rename that puts it in the entry."""
    cache = ShotCache(root)
    os.replace = lambda src, dst: os._exit(9)
    cache.put_video("ee55", mp4, 8)


def test_killed_video_writer_leaves_the_take_whole(tmp_path):
    ShotCache(tmp_path).put(take("ee55"))
    mp4 = tmp_path / "shot.mp4"
    mp4.write_bytes(b"an mp4's bytes")
    proc = mp.get_context("fork").Process(target=_killed_video_writer, args=(str(tmp_path), str(mp4)))
    proc.start()
    proc.join(30)
    assert proc.exitcode == 9
    cache = ShotCache(tmp_path)
    assert cache.get("ee55") is not None and cache.video("ee55", 8) is None
    assert [p.name[:6] for p in (tmp_path / "tmp").iterdir()] == ["video-"]  # staged, cleaned after an hour
    assert cache.put_video("ee55", mp4, 8) and cache.video("ee55", 8).read_bytes() == b"an mp4's bytes"


def test_lru_eviction_under_the_cap(tmp_path):
    probe = ShotCache(tmp_path / "probe")
    probe.put(take("aa00"))
    size = probe.stats().bytes
    cache = ShotCache(tmp_path / "c", max_bytes=int(size * 2.5))
    cache.put(take("aa01"))
    time.sleep(0.02)
    cache.put(take("aa02"))
    time.sleep(0.02)
    assert cache.get("aa01") is not None  # aa01 is now the most recently used
    time.sleep(0.02)
    cache.put(take("aa03"))  # over the cap: the least recently used (aa02) goes
    assert cache.contains("aa01") and not cache.contains("aa02") and cache.contains("aa03")
    assert cache.stats().bytes <= cache.max_bytes and cache.stats().evictions == 1


def _writer(root: str, worker: int) -> None:
    cache = ShotCache(root)
    for i in range(12):
        cache.put(take(f"{i % 6:04x}", fill=worker))
        assert cache.get(f"{i % 6:04x}") is not None
        cache.point(f"ff{i % 3:02x}", f"{i % 6:04x}")


def test_two_processes_share_one_cache(tmp_path):
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w)) for w in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    cache = ShotCache(tmp_path)
    assert cache.stats().entries == 6
    for i in range(6):
        t = cache.get(f"{i:04x}")
        assert t is not None and t.meta["seed"] in (1, 2) and int(t.frames[0, 0, 0, 0]) == t.meta["seed"]
    assert all(cache.pointer(f"ff{i:02x}") is not None for i in range(3))
    assert not list((tmp_path / "tmp").iterdir())


def test_planted_symlinks_and_tampered_pointers_are_never_followed(tmp_path):
    """A link planted where an entry would be (to a folder holding a valid take) is neither served,
    counted nor deleted through; a put replaces the link and leaves its target alone; a pointer
    file edited to hold a path is ignored."""
    import shutil
    outside = tmp_path / "outside"
    donor = ShotCache(tmp_path / "donor")
    donor.put(take("abcd", fill=9))
    shutil.copytree(donor._entry("abcd"), outside)
    before = sorted((p.name, p.read_bytes()) for p in outside.iterdir())
    cache = ShotCache(tmp_path / "cache", max_bytes=1)  # every put evicts all it may
    link = cache._entry("abcd")
    link.parent.mkdir(parents=True)
    link.symlink_to(outside, target_is_directory=True)
    assert not cache.contains("abcd") and cache.get("abcd") is None
    assert cache.stats().entries == 0
    cache.put(take("1234"))  # eviction scans past the link without following it
    assert sorted((p.name, p.read_bytes()) for p in outside.iterdir()) == before
    cache.put(take("abcd", fill=4))
    assert not link.is_symlink() and int(cache.get("abcd").frames[0, 0, 0, 0]) == 4
    assert sorted((p.name, p.read_bytes()) for p in outside.iterdir()) == before
    # a pointer edited by hand
    cache.point("ff01", "abcd")
    assert cache.pointer("ff01") == "abcd"
    for planted in ('{"key": "../../outside"}', '{"key": 7}', "[1]", "\x00\xff"):
        (cache.root / "pointers" / "ff01.json").write_text(planted, errors="surrogateescape")
        assert cache.pointer("ff01") is None
    for name in ("../x", "/etc/passwd", "ab\x00cd"):
        with pytest.raises(ValueError):
            cache.point(name, "abcd")
