"""The disk KV store's directory: what the store owns in it (its naming, in real sub-directories, regular
files only: see :mod:`flashback_agents.kvstore`'s **Ownership**), creating it, listing, measuring and
deleting those files, and the byte budget (least recently used first). Nothing else is ever deleted."""

from __future__ import annotations

import os
import re
import stat
import time
from pathlib import Path

from .contextbase import ContextError

SUFFIX = ".safetensors"
MARKER = ".flashback-kvstore"  # written into a directory the store creates (or finds empty)
KEY_DIR = re.compile(r"[0-9a-f]{24}\Z")  # DIR/<model key>/
OWN_FILE = re.compile(r"[0-9a-f]{32}" + re.escape(SUFFIX) + r"\Z")  # DIR/<model key>/<content hash>.safetensors
OWN_TMP = re.compile(r"\.[0-9a-f]{32}" + re.escape(SUFFIX) + r"\.\d+\.[0-9a-f]{8}\.tmp\Z")  # contextfile's temp


class KVStoreWarning(UserWarning):
    """A stored context was skipped (corrupt, truncated, foreign or unreadable) and is recomputed.

    Nothing from the file was used. Delete the file (or the store directory) if the warning recurs."""


class KVStoreError(ContextError):
    """A disk store that cannot be used as configured (bad directory or budget)."""


def create_store_dir(directory: Path) -> None:
    """Create the store directory (mode 0700 when new: see **Trust**); a new or empty one gets the marker file."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with os.scandir(directory) as it:
            empty = next(it, None) is None
        if empty:  # new (or empty): say whose it is
            (directory / MARKER).write_text(
                "A flashback-agents KV store (flashback_agents.kvstore.DiskKVStore). Its byte budget and "
                "clear() delete only <24 hex digits>/<32 hex digits>.safetensors files in it (and their "
                ".tmp files); nothing else here is touched.\n", encoding="utf-8")
    except OSError as exc:
        raise KVStoreError(f"cannot create the KV store directory {directory} ({exc}); pass a writable "
                           "kv_store_dir") from exc


def key_dirs(directory: Path) -> list[os.DirEntry]:
    """The store's own sub-directories: named by a model key, real directories (links not followed)."""
    try:
        with os.scandir(directory) as it:
            return [e for e in it if KEY_DIR.match(e.name) and e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def own_files(sub: str | os.PathLike, tmp: bool = False) -> list[tuple[os.DirEntry, os.stat_result]]:
    """Regular files (never links) in one of the store's sub-directories named as the store names
    them: its stored contexts, or (``tmp``) its temporary files."""
    pattern = OWN_TMP if tmp else OWN_FILE
    out = []
    try:
        with os.scandir(sub) as it:
            for e in it:
                if not pattern.match(e.name):
                    continue
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    out.append((e, st))
    except OSError:
        pass
    return out


def is_owned(directory: Path, path: Path) -> bool:
    """Whether the store wrote ``path`` (its naming, in one of its real sub-directories, a regular
    file): only such a file is ever deleted."""
    parent = path.parent
    if parent.parent != directory or not KEY_DIR.match(parent.name) or not OWN_FILE.match(path.name):
        return False
    try:
        return stat.S_ISDIR(os.lstat(parent).st_mode) and stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def stored_bytes(directory: Path) -> int:
    """Bytes of the stored contexts in the directory (every model; only files the store wrote)."""
    return sum(st.st_size for sub in key_dirs(directory) for _, st in own_files(sub.path))


def delete_all(directory: Path) -> None:
    """Delete every stored context (every model): the files the store wrote, nothing else."""
    for sub in key_dirs(directory):
        for de, _ in own_files(sub.path):
            Path(de.path).unlink(missing_ok=True)


def enforce_budget(directory: Path, max_bytes: int, keep: Path | None = None) -> list[tuple[str, Path]]:
    """Delete least recently used stored contexts (of every model in the directory) while over
    ``max_bytes`` (never ``keep``); the store's temporary files older than an hour (a writer that died) go
    too. Only files the store wrote are counted or deleted. Returns the (model key, file) deleted."""
    files = []
    now = time.time()
    for sub in key_dirs(directory):
        for de, st in own_files(sub.path, tmp=True):
            if now - st.st_mtime > 3600:
                Path(de.path).unlink(missing_ok=True)
        for de, st in own_files(sub.path):
            files.append((st.st_mtime, st.st_size, Path(de.path), sub.name))
    total = sum(f[1] for f in files)
    deleted = []
    for mtime, size, path, key in sorted(files):
        if total <= max_bytes:
            break
        if keep is not None and path == keep:
            continue
        try:
            path.unlink()
        except OSError:
            continue
        total -= size
        deleted.append((key, path))
    return deleted


def store_path(directory: str | os.PathLike) -> str:
    """The canonical form of a store directory (engines and stores are keyed by it)."""
    if not isinstance(directory, (str, os.PathLike)) or not str(directory).strip():
        raise KVStoreError(f"kv_store_dir must be a directory path, got {directory!r}")
    return str(Path(os.path.expanduser(str(directory))).resolve())
