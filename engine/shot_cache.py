"""The shot cache: finished takes on disk, content-addressed, atomic, size-capped (LRU).

For: `ShotCache(root, max_bytes)` with `get(key) -> Take | None` (`read(key)`: the same, neither
counted nor touching the LRU clock; `read_frames(key, indices)`: a few decoded frames alone;
`meta(key)`: the meta alone), `put(take)`, `contains`, `invalidate(key)`, `stats()`; a take's MP4
kept beside it (`put_video(key, path, fps)`, `video(key, fps)`), so that a cached shot is copied,
not encoded again; a small pointer index (`point(name, key)`, `pointer(name)`) that the engine uses
to find the current take of a shot slot, and a bounded history per name (`remember(name, key)`,
`history(name)`) that lists a shot's takes. Safe across restarts and for two processes sharing one
folder.
Not for: deciding keys (engine.py computes them from everything that changes a take's output).

On disk:
  entries/<k[:2]>/<key>/take.safetensors   frames (T,H,W,3) uint8, latents (C,f,h,w) fp32, routing
  entries/<k[:2]>/<key>/meta.json          seed, shot, caption, routing meta, ... (written last)
  entries/<k[:2]>/<key>/used               its mtime is the LRU clock
  entries/<k[:2]>/<key>/video_<fps>fps.mp4 its MP4 (optional: added after the take; older takes have none)
  pointers/<name>.json                     {"key": ...}, atomically replaced
  histories/<name>.json                    {"keys": [oldest, ..., newest]}, atomically replaced under the lock
  tmp/                                     staging; a write is a rename of a complete folder
  lock                                     flock for put/put_video/evict (readers never lock)
Atomicity: a take is staged in tmp/ (files fsynced), then renamed into entries/ in one step; a
killed writer leaves only a tmp/ folder, removed by the next ShotCache after an hour. A take's MP4
is staged there too, then renamed into its entry (a whole one) under the lock. Eviction renames an
entry into tmp/ before deleting it (its MP4 with it), so a reader sees a whole entry or none.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engine.story import _fsync_dir, atomic_write_text, is_cache_key

STALE_TMP_SECONDS = 3600  # staging folders older than this belong to killed writers
MAX_HISTORY = 16  # keys a history keeps; the oldest go first


@dataclass
class Take:
    key: str  # content address
    frames: torch.Tensor  # (T, H, W, 3) uint8 decoded video
    latents: torch.Tensor  # (C, f, h, w) float32 clean latents (context for later shots)
    meta: dict  # seed, shot index, caption, generated_with, seconds, routing meta, ...
    tensors: dict = field(default_factory=dict)  # extra tensors (routing statistics)


@dataclass(frozen=True)
class CacheStats:
    hits: int  # get() calls that found an entry (this process)
    misses: int  # get() calls that did not
    entries: int  # takes on disk now
    bytes: int  # their size on disk
    max_bytes: int  # the cap
    evictions: int  # takes this process evicted


def _save_tensors(tensors: dict, path: Path) -> None:
    """safetensors' save_file, with its I/O failures as the OSError they are (a full disk must be
    recognisable as one: safetensors reports it as SafetensorError)."""
    try:
        save_file(tensors, path)
    except Exception as err:  # SafetensorError is not importable as a public name in every version
        text = str(err)
        if isinstance(err, OSError):
            raise
        if "os error 28" in text or "No space left" in text:
            raise OSError(errno.ENOSPC, "No space left on device", str(path)) from err
        if "os error 122" in text:
            raise OSError(errno.EDQUOT, "Disk quota exceeded", str(path)) from err
        raise


class ShotCache:
    def __init__(self, root: str | Path, max_bytes: int = 4 << 30):
        self.root = Path(root)
        self.max_bytes = int(max_bytes)  # total size cap; least recently used takes go first
        self.hits = self.misses = self.evictions = 0
        for sub in ("entries", "pointers", "histories", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._clean_tmp()

    # ---- paths and locking --------------------------------------------------------------------

    def _entry(self, key: str) -> Path:
        if not is_cache_key(key):
            raise ValueError(f"cache keys are lowercase hex strings, got {key!r}")
        return self.root / "entries" / key[:2] / key

    @contextmanager
    def _locked(self):
        with open(self.root / "lock", "a+") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _clean_tmp(self) -> None:
        now = time.time()
        for p in (self.root / "tmp").iterdir():
            try:
                if now - p.stat().st_mtime > STALE_TMP_SECONDS:
                    shutil.rmtree(p, ignore_errors=True)
            except FileNotFoundError:
                continue

    # ---- takes --------------------------------------------------------------------------------

    def contains(self, key: str) -> bool:
        return _is_whole_entry(self._entry(key))

    def record_misses(self, count: int) -> None:
        """Count lookups made by key planning (pointer/contains) that found no usable take."""
        self.misses += count

    def get(self, key: str) -> Take | None:
        """The take, or None (a miss). Touches its LRU clock."""
        take = self.read(key)
        try:
            if take is not None:
                os.utime(self._entry(key) / "used")
        except OSError:
            take = None
        if take is None:
            self.misses += 1
            return None
        self.hits += 1
        return take

    def read(self, key: str) -> Take | None:
        """The take, or None; for looking at it (recall pictures, reports): not counted as a hit
        or a miss and leaves the LRU clock alone."""
        meta = self.meta(key)  # None: missing, or planted (a link to elsewhere): never served
        if meta is None:
            return None
        try:
            tensors = load_file(self._entry(key) / "take.safetensors")
        except (FileNotFoundError, OSError):
            return None
        frames, latents = tensors.pop("frames"), tensors.pop("latents")
        return Take(key=key, frames=frames, latents=latents, meta=meta, tensors=tensors)

    def read_frames(self, key: str, indices: list[int]) -> torch.Tensor | None:
        """(n, H, W, 3) uint8: frames `indices` of a take's decoded video (clamped to its length),
        read alone (not the latents, not the other frames); None if the take is absent. Uncounted."""
        folder = self._entry(key)
        if not _is_whole_entry(folder):
            return None
        try:
            with safe_open(folder / "take.safetensors", framework="pt") as f:
                frames = f.get_slice("frames")
                last = frames.get_shape()[0] - 1
                return torch.cat([frames[min(max(i, 0), last):min(max(i, 0), last) + 1] for i in indices])
        except (FileNotFoundError, OSError):
            return None

    def meta(self, key: str) -> dict | None:
        """A take's meta.json (seed, caption, created, ...) without loading its tensors; None if gone.
        Neither a hit nor a miss, and the LRU clock is left alone: listing takes is not using them."""
        folder = self._entry(key)
        if not _is_whole_entry(folder):
            return None
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError, OSError):
            return None
        return meta if isinstance(meta, dict) else None

    def put(self, take: Take) -> None:
        """Store a take atomically; a take already present (same key) is kept as it is."""
        dest = self._entry(take.key)
        if _is_whole_entry(dest):
            return
        if dest.is_symlink():  # planted: the link goes, what it points at is never touched
            with self._locked():
                dest.unlink(missing_ok=True)
        stage = self.root / "tmp" / f"put-{uuid.uuid4().hex}"
        stage.mkdir()
        try:
            tensors = {"frames": take.frames.contiguous().cpu(), "latents": take.latents.float().contiguous().cpu()}
            tensors.update({k: v.contiguous().cpu() for k, v in take.tensors.items()})
            _save_tensors(tensors, stage / "take.safetensors")
            _fsync_file(stage / "take.safetensors")
            (stage / "used").touch()
            atomic_write_text(stage / "meta.json", json.dumps({**take.meta, "key": take.key}, indent=1))
            dest.parent.mkdir(parents=True, exist_ok=True)
            with self._locked():
                try:
                    os.rename(stage, dest)  # atomic: the entry appears whole
                except OSError:
                    if not (dest / "meta.json").is_file():
                        raise
                    # another process stored the same key first: keep theirs
                _fsync_dir(dest.parent)
                self._evict_locked(keep=take.key)
        finally:
            if stage.exists():
                shutil.rmtree(stage, ignore_errors=True)

    def put_video(self, key: str, path: str | Path, fps: int) -> bool:
        """Keep a copy of take `key`'s MP4 at `fps` (written by engine.video.write_mp4) in its entry,
        where the entry still exists; True if it was kept. A video already there is replaced."""
        dest = self._entry(key)
        if not _is_whole_entry(dest):
            return False
        stage = self.root / "tmp" / f"video-{uuid.uuid4().hex}"
        stage.mkdir()
        try:
            staged = stage / _video_name(fps)
            shutil.copyfile(path, staged)
            _fsync_file(staged)
            with self._locked():
                if not _is_whole_entry(dest):  # evicted by another process meanwhile
                    return False
                os.replace(staged, dest / staged.name)  # atomic: the video appears whole (a link there goes)
                _fsync_dir(dest)
                self._evict_locked(keep=key)  # the entry grew
            return True
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def video(self, key: str, fps: int) -> Path | None:
        """The MP4 kept with take `key` at `fps` (a plain file in a whole entry), or None. Uncounted.
        Read it at once: another process may evict the take (copy it; never change it in place)."""
        folder = self._entry(key)
        p = folder / _video_name(fps)
        if not _is_whole_entry(folder) or p.is_symlink() or not p.is_file():
            return None
        return p

    def invalidate(self, key: str) -> bool:
        """Remove one take; True if it was there."""
        with self._locked():
            return self._remove_locked(self._entry(key))

    def _remove_locked(self, folder: Path) -> bool:
        trash = self.root / "tmp" / f"del-{uuid.uuid4().hex}"
        try:
            os.rename(folder, trash)
        except FileNotFoundError:
            return False
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def _scan(self) -> list[tuple[float, int, Path]]:
        """(last used, bytes, folder) of every complete entry."""
        out = []
        for folder in (self.root / "entries").glob("*/*"):
            if folder.is_symlink():  # planted links are neither counted nor followed
                continue
            try:
                used = (folder / "used").stat().st_mtime
                size = sum(p.stat().st_size for p in folder.iterdir())
            except FileNotFoundError:
                continue
            if (folder / "meta.json").is_file():
                out.append((used, size, folder))
        return out

    def _evict_locked(self, keep: str = "") -> None:
        entries = sorted(self._scan())
        total = sum(size for _, size, _ in entries)
        for _, size, folder in entries:
            if total <= self.max_bytes:
                break
            if folder.name == keep:
                continue
            if self._remove_locked(folder):
                total -= size
                self.evictions += 1

    def stats(self) -> CacheStats:
        entries = self._scan()
        return CacheStats(hits=self.hits, misses=self.misses, entries=len(entries),
                          bytes=sum(size for _, size, _ in entries), max_bytes=self.max_bytes,
                          evictions=self.evictions)

    def clear(self) -> None:
        with self._locked():
            for folder in list((self.root / "entries").glob("*/*")):
                self._remove_locked(folder)

    # ---- pointers: slot -> current take -------------------------------------------------------

    def point(self, name: str, key: str) -> None:
        self._entry(name)  # validates: pointer names are hex like keys
        atomic_write_text(self.root / "pointers" / f"{name}.json", json.dumps({"key": key}))

    def pointer(self, name: str) -> str | None:
        """The take key a slot points at, if that take is still cached."""
        self._entry(name)
        try:
            key = json.loads((self.root / "pointers" / f"{name}.json").read_text())["key"]
        except (OSError, ValueError, KeyError, TypeError):  # missing, unreadable or tampered with
            return None
        if not is_cache_key(key):
            return None
        return key if self.contains(key) else None

    # ---- histories: shot -> its takes, oldest first ------------------------------------------

    def remember(self, name: str, key: str, limit: int = MAX_HISTORY) -> None:
        """Add `key` to history `name` (a key already there keeps its place); keys the cache has
        evicted are dropped, then the oldest beyond `limit`. Locked: two writers never lose a key."""
        self._entry(name)
        self._entry(key)
        with self._locked():
            keys = [k for k in self._read_history(name) if self.contains(k)]
            if key not in keys:
                keys.append(key)
            atomic_write_text(self.root / "histories" / f"{name}.json", json.dumps({"keys": keys[-limit:]}))

    def history(self, name: str) -> list[str]:
        """The keys remembered under `name`, oldest first, that are still cached."""
        self._entry(name)
        return [k for k in self._read_history(name) if self.contains(k)]

    def _read_history(self, name: str) -> list[str]:
        try:
            keys = json.loads((self.root / "histories" / f"{name}.json").read_text())["keys"]
        except (OSError, ValueError, KeyError, TypeError):  # none yet, unreadable or tampered with
            return []
        return [k for k in keys if is_cache_key(k)] if isinstance(keys, list) else []


def _is_whole_entry(folder: Path) -> bool:
    """A complete entry this cache wrote: a real folder (no symlink) with its files as plain files."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    for name in ("meta.json", "take.safetensors", "used"):
        p = folder / name
        if p.is_symlink() or not p.is_file():
            return False
    return True


def _video_name(fps: int) -> str:
    """fps is not part of a take's key (it does not change the frames), so it names the file."""
    return f"video_{int(fps)}fps.mp4"


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


__all__ = ["ShotCache", "Take", "CacheStats"]
