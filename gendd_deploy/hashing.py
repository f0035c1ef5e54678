"""sha256 of files and of JSON-able objects: the one place the package hashes anything (artifact
fingerprints and file checks, data fingerprints, source listings)."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any


def canonical_json(obj: Any) -> str:
    """Key-sorted, compact JSON: equal objects give equal strings, so equal hashes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def json_sha256(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


@functools.lru_cache(maxsize=1024)
def _file_sha256(path: str, size: int, mtime_ns: int, inode: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, cached in-process on (path, size, mtime, inode): a file rewritten in place
    gets a new mtime (and a replaced one a new inode), so it is hashed again."""
    p = Path(path).resolve()
    st = p.stat()
    return _file_sha256(str(p), st.st_size, st.st_mtime_ns, st.st_ino)
