"""sha256 of files and of JSON-able objects: the one place the package hashes anything (artifact
fingerprints and file checks, data fingerprints, source listings)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def canonical_json(obj: Any) -> str:
    """Key-sorted, compact JSON: equal objects give equal strings, so equal hashes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def json_sha256(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


PERSIST_MIN_BYTES = 1 << 20  # smaller files hash faster than a cache lookup is worth keeping


def _hash_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class HashCache:
    """sha256 of large files kept across runs, so a multi-GB feature cache is not re-read each time
    a stage reuses it. Keyed on (path, size, mtime, ctime, inode): any write to a file, or a file
    put in its place, changes its ctime, which no user can set back, so a tampered file is hashed
    again. Kept outside the artifact root (which may be shared): $GENDD_HASH_CACHE, else
    $XDG_CACHE_HOME/gendd/sha256.jsonl (~/.cache); GENDD_HASH_CACHE=off keeps it in memory only.
    One JSON line per entry, appended; unreadable lines are ignored."""

    def __init__(self, path: Path | None):
        self.path = path
        self._entries: dict[str, str] | None = None

    @classmethod
    def from_env(cls) -> "HashCache":
        where = os.environ.get("GENDD_HASH_CACHE")
        if where == "off":
            return cls(None)
        if where:
            return cls(Path(where))
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return cls(base / "gendd" / "sha256.jsonl")

    @staticmethod
    def key(path: str, st: os.stat_result) -> str:
        return f"{path}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"

    def _load(self) -> dict[str, str]:
        if self._entries is None:
            self._entries = {}
            try:
                with open(self.path, encoding="utf-8") as f:  # type: ignore[arg-type]
                    for line in f:
                        try:
                            k, v = json.loads(line)
                        except (ValueError, TypeError):
                            continue
                        if isinstance(k, str) and isinstance(v, str) and len(v) == 64:
                            self._entries[k] = v
            except (OSError, TypeError):
                pass
        return self._entries

    def get(self, key: str) -> str | None:
        return self._load().get(key)

    def put(self, key: str, digest: str) -> None:
        self._load()[key] = digest
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:  # one short line: appends do not interleave
                f.write(json.dumps([key, digest]) + "\n")
        except OSError:
            pass  # a cache that cannot be written only costs time


_CACHE: HashCache | None = None


def file_sha256(path: str | Path) -> str:
    """sha256 of a file; large files through the HashCache (size, mtime, ctime, inode)."""
    global _CACHE
    p = str(Path(path).resolve())
    st = os.stat(p)
    if st.st_size < PERSIST_MIN_BYTES:
        return _hash_file(p)
    if _CACHE is None:
        _CACHE = HashCache.from_env()
    key = HashCache.key(p, st)
    digest = _CACHE.get(key)
    if digest is None:
        digest = _hash_file(p)
        _CACHE.put(key, digest)
    return digest
