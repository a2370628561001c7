"""Running out of memory or disk: a message that names what to change, nothing the user made is
lost or corrupted, and the engine renders normally afterwards."""

import errno
import subprocess
from pathlib import Path

import pytest
import torch

from engine.engine import ResourceError, StoryEngine
from engine.sampler import StorySampler
from engine.shot_cache import ShotCache
from engine.story import Story
from tests.engine.conftest import tiny_story


def _cache_is_consistent(cache: ShotCache) -> int:
    """Every entry on disk loads whole; nothing is left staged. Returns the entry count."""
    entries = [p for p in (cache.root / "entries").glob("*/*")]
    for folder in entries:
        take = cache.get(folder.name)
        assert take is not None and take.frames.dtype == torch.uint8 and take.latents.ndim == 4, folder
    assert not list((cache.root / "tmp").iterdir())
    return len(entries)


def test_out_of_memory_names_the_settings_and_the_engine_recovers(make_engine, monkeypatch):
    engine = make_engine()
    story = tiny_story("joint")
    real = StorySampler.sample
    calls = {"n": 0}

    def oom_on_second_run(self, run, run_index=0, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(self, run, run_index, **kwargs)
    monkeypatch.setattr(StorySampler, "sample", oom_on_second_run)
    with pytest.raises(ResourceError) as err:
        engine.render(story)
    text = str(err.value)
    assert "Out of CPU memory" in text and "settings.height x settings.width (now 48x80)" in text
    assert "settings.mode = shot_by_shot" in text and "shots[0].frames = 3" in text
    result = engine.render(story)  # the next render works
    assert [s.status for s in result.shots] == ["generated"] * 3
    monkeypatch.setattr(StorySampler, "sample", real)


def test_cpu_allocator_failure_is_out_of_memory_too(make_engine, monkeypatch):
    engine = make_engine()
    monkeypatch.setattr(StorySampler, "sample", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory")))
    with pytest.raises(ResourceError, match="Out of CPU memory"):
        engine.render(tiny_story("shot_by_shot"))
    monkeypatch.setattr(StorySampler, "sample", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # other failures are not disguised as resources
        engine.render(tiny_story("shot_by_shot"))


def test_disk_full_mid_render_keeps_finished_shots(make_engine, monkeypatch):
    """The third cache write fails with ENOSPC: a message, the two finished takes are served next
    time, nothing half-written is left."""
    import engine.shot_cache as shot_cache
    engine = make_engine()
    story = tiny_story("shot_by_shot")
    real, writes = shot_cache.save_file, {"n": 0}  # under _save_tensors

    def fill_up(tensors, path, *a, **k):
        writes["n"] += 1
        if writes["n"] == 3:
            Path(path).write_bytes(b"half a take")  # what a full disk leaves behind
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(tensors, path, *a, **k)
    monkeypatch.setattr(shot_cache, "save_file", fill_up)
    with pytest.raises(ResourceError, match="disk is full"):
        engine.render(story)
    assert _cache_is_consistent(engine.cache) == 2
    monkeypatch.setattr(shot_cache, "save_file", real)
    result = engine.render(story)
    assert [s.status for s in result.shots] == ["cached", "cached", "generated"]
    assert _cache_is_consistent(engine.cache) == 3


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def test_a_really_full_disk(tiny_model, tmp_path):
    """A 160 kB tmpfs holds the cache, the outputs and a saved story: the render runs out of
    room, the story file and every cached take stay valid, and the message says so."""
    disk = tmp_path / "small-disk"
    if not _mount_tmpfs(disk, "160k"):
        pytest.skip("cannot mount a tmpfs here (not root, or no CAP_SYS_ADMIN); the ENOSPC test above covers it")
    try:
        story = tiny_story("shot_by_shot", frames=(8, 8, 8))
        saved = story.save(disk / "story.json")
        before = saved.read_bytes()
        engine = StoryEngine(tiny_model, ShotCache(disk / "cache"), disk)
        with pytest.raises(ResourceError, match="disk is full"):
            engine.render(story, out_dir=disk / "out")
        assert saved.read_bytes() == before and Story.load(saved) == story
        _cache_is_consistent(engine.cache)
        try:  # take the last free bytes (the render may have left none)
            with open(disk / "filler", "wb") as f:
                while True:
                    f.write(b"x" * 4096)
                    f.flush()
        except OSError:
            pass
        with pytest.raises(OSError) as err:  # saving over it on the full disk: the old file stays whole
            (story.with_settings(steps=5)).save(saved)
        assert err.value.errno == errno.ENOSPC
        assert saved.read_bytes() == before and not [p for p in disk.iterdir() if p.name.endswith(".tmp")]
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=10)
