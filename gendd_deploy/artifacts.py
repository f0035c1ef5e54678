"""The artifact store: immutable, versioned, verifiable stage outputs.

Layout: `<root>/<pipeline>/<stage>/<version>/` with payload files and `manifest.json`.
A version is published atomically: files are written into a hidden temporary sibling, the
manifest is written last, then the folder is renamed into place. A folder without a manifest is
never listed. Long stages keep resumable state in a `.work-<fp>` folder next to the versions,
removed once the version is published.

The root may be shared, so nothing here trusts what it reads: a manifest is checked for shape,
its own digest (any edit shows) and file paths confined to its folder; `gc` removes only the
folders this store creates (exact `.tmp-<hex>` names, drafts whose owner process is gone),
never follows a symlink and never leaves the root; one process at a time builds a given
(pipeline, stage, fingerprint), under a file lock (`.lock-<fp>`), so concurrent runs on one root
publish one version per fingerprint.

Longer than most modules (~450 lines) because the store is one unit: drafts, locks, atomic
publish, verification and garbage collection share its layout rules, and splitting them would
spread those rules over several files.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from gendd_deploy.envinfo import environment
from gendd_deploy.errors import ArtifactError, UsageError
from gendd_deploy.hashing import file_sha256, json_sha256
from gendd_deploy.signing import SIGNATURE, sign, signing_key

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
_VERSION_RE = re.compile(r"^v(\d{3,})$")
_TMP_RE = re.compile(r"^\.tmp-[0-9a-f]{12}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
OWNER_SUFFIX = ".owner"  # beside a draft `.tmp-<hex>`: who is writing it (JSON)
STALE_DRAFT_S = 24 * 3600  # a draft from another host is left alone for this long


def fingerprint(stage: str, config: dict, inputs: dict[str, str]) -> str:
    """sha256 of stage name, resolved config, input fingerprints and schema version."""
    payload = {"schema": SCHEMA_VERSION, "stage": stage, "config": config, "inputs": dict(sorted(inputs.items()))}
    return json_sha256(payload)


sha256_file = file_sha256  # the name the stages use


@dataclass
class Artifact:
    path: Path
    manifest: dict

    @property
    def stage(self) -> str:
        return self.manifest["stage"]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def pipeline(self) -> str:
        return self.manifest["pipeline"]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def short(self) -> str:
        return self.fingerprint[:8]

    @property
    def ref(self) -> str:
        """Human handle: pipeline/stage/version."""
        return f"{self.pipeline}/{self.stage}/{self.version}"

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics", {})

    @property
    def config(self) -> dict:
        return self.manifest.get("config", {})

    def file(self, name: str) -> Path:
        p = self.path / name
        if name not in {f["path"] for f in self.manifest.get("files", [])}:
            raise ArtifactError(f"{self.ref} has no file '{name}' in its manifest")
        return p

    def as_input(self) -> dict:
        return {"stage": self.stage, "version": self.version, "fingerprint": self.fingerprint, "pipeline": self.pipeline}

    def summary(self) -> dict:
        return {
            "pipeline": self.pipeline,
            "stage": self.stage,
            "version": self.version,
            "fingerprint": self.fingerprint,
            "path": str(self.path),
            "created": self.manifest.get("created"),
            "metrics": self.metrics,
        }


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without its own `digest` entry."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return json_sha256(body)


def _confined(rel: object) -> bool:
    """A relative POSIX path that stays inside its folder (no '..', not absolute, no NUL)."""
    if not isinstance(rel, str) or not rel or "\x00" in rel or "\\" in rel or rel.startswith("/"):
        return False
    parts = rel.split("/")
    return all(p not in ("", ".", "..") for p in parts)


def check_manifest(folder: Path, m: object) -> str | None:
    """Why this parsed manifest cannot be trusted (None: it can)."""
    if not isinstance(m, dict):
        return "not a JSON object"
    expect = {"schema": int, "pipeline": str, "stage": str, "version": str, "fingerprint": str, "files": list, "metrics": dict, "info": dict, "config": dict, "inputs": list}
    for key, kind in expect.items():
        if not isinstance(m.get(key), kind):
            return f"'{key}' missing or not a {kind.__name__}"
    if m.get("digest") != manifest_digest(m):
        return "its digest does not match its content (edited or damaged)"
    if m["version"] != folder.name or m["stage"] != folder.parent.name or m["pipeline"] != folder.parent.parent.name:
        return f"it names {m['pipeline']}/{m['stage']}/{m['version']} but lies in {folder.parent.parent.name}/{folder.parent.name}/{folder.name}"
    if not _HEX64.match(m["fingerprint"]):
        return "fingerprint is not 64 hex digits"
    for f in m["files"]:
        if not isinstance(f, dict) or not _confined(f.get("path")) or not isinstance(f.get("bytes"), int) or not _HEX64.match(str(f.get("sha256", ""))):
            return f"bad files entry {str(f)[:80]!r} (paths must stay inside the artifact folder)"
    return None


def read_manifest(folder: Path) -> dict:
    try:
        raw = (folder / MANIFEST).read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"{folder} has no {MANIFEST}; it is not a published artifact") from None
    try:
        m = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{folder / MANIFEST} is corrupt ({type(e).__name__}); delete {folder} and rerun the stage that made it") from None
    problem = check_manifest(folder, m)
    if problem:
        raise ArtifactError(f"{folder / MANIFEST} cannot be trusted: {problem}; delete {folder} and rerun the stage that made it")
    return m


def verify_artifact(art: Artifact) -> list[str]:
    """Re-hash every payload file; return one message per problem (empty = intact)."""
    problems = []
    listed = set()
    for entry in art.manifest.get("files", []):
        rel = entry["path"]
        listed.add(rel)
        p = art.path / rel
        if not _confined(rel) or p.is_symlink() or not p.resolve().is_relative_to(art.path.resolve()):
            problems.append(f"{art.ref}: file path {rel!r} leaves the artifact folder")
            continue
        if not p.is_file():
            problems.append(f"{art.ref}: missing file {rel}")
            continue
        size = p.stat().st_size
        if size != entry["bytes"]:
            problems.append(f"{art.ref}: {rel} has {size} bytes, manifest says {entry['bytes']}")
            continue
        digest = sha256_file(p)
        if digest != entry["sha256"]:
            problems.append(f"{art.ref}: {rel} sha256 {digest[:12]} does not match manifest {entry['sha256'][:12]}")
    for p in sorted(art.path.rglob("*")):
        rel = p.relative_to(art.path).as_posix()
        if p.is_file() and rel not in (MANIFEST, SIGNATURE) and rel not in listed:
            problems.append(f"{art.ref}: unexpected file {rel} not in manifest")
    return problems


class Draft:
    """A version being written. Use as a context manager; `publish()` makes it visible."""

    def __init__(self, store: "Store", pipeline: str, stage: str, fp: str, config: dict, inputs: list[Artifact], extra_inputs: dict):
        self.store, self.pipeline, self.stage, self.fp = store, pipeline, stage, fp
        self.config, self.inputs, self.extra_inputs = config, inputs, extra_inputs
        self.metrics: dict[str, Any] = {}
        self.info: dict[str, Any] = {}
        stage_dir = store.stage_dir(pipeline, stage)
        stage_dir.mkdir(parents=True, exist_ok=True)
        self.dir = stage_dir / f".tmp-{uuid.uuid4().hex[:12]}"
        # who writes this draft, written first: gc leaves the draft alone while that process lives
        self.owner = self.dir.with_name(self.dir.name + OWNER_SUFFIX)
        self.owner.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}))
        self.dir.mkdir()
        self.published: Artifact | None = None

    def __enter__(self) -> "Draft":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.published is None:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.owner.unlink(missing_ok=True)

    def path(self, name: str) -> Path:
        p = self.dir / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def publish(self) -> Artifact:
        files = []
        for p in sorted(self.dir.rglob("*")):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
                files.append({"path": p.relative_to(self.dir).as_posix(), "bytes": p.stat().st_size, "sha256": sha256_file(p)})
        stage_dir = self.store.stage_dir(self.pipeline, self.stage)
        key = signing_key()
        for _ in range(100):
            version = f"v{self.store.next_number(self.pipeline, self.stage):03d}"
            manifest = {
                "schema": SCHEMA_VERSION,
                "pipeline": self.pipeline,
                "stage": self.stage,
                "version": version,
                "fingerprint": self.fp,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "config": self.config,
                "inputs": [a.as_input() for a in self.inputs] + [{"stage": k, "fingerprint": v} for k, v in sorted(self.extra_inputs.items())],
                "files": files,
                "metrics": self.metrics,
                "info": self.info,
                "environment": environment(),
            }
            manifest["digest"] = manifest_digest(json.loads(json.dumps(manifest, default=str)))
            tmp = self.dir / (MANIFEST + ".part")
            tmp.write_text(json.dumps(manifest, indent=2, default=str))
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.dir / MANIFEST)
            if key is not None:  # GENDD_SIGNING_KEY: the signature covers the manifest, hence every file
                sign(self.dir, manifest, key)
            final = stage_dir / version
            try:
                os.rename(self.dir, final)
            except OSError:
                if final.exists():  # another process took this number; try the next
                    continue
                raise
            self.published = Artifact(final, manifest)
            shutil.rmtree(self.store.work_dir(self.pipeline, self.stage, self.fp), ignore_errors=True)
            return self.published
        raise ArtifactError(f"could not allocate a version folder in {stage_dir}")


class Store:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def stage_dir(self, pipeline: str, stage: str) -> Path:
        return self.root / pipeline / stage

    def work_dir(self, pipeline: str, stage: str, fp: str) -> Path:
        """Resumable scratch state (checkpoints) for one fingerprint; survives a kill."""
        return self.stage_dir(pipeline, stage) / f".work-{fp[:16]}"

    def next_number(self, pipeline: str, stage: str) -> int:
        nums = [int(m.group(1)) for p in self.stage_dir(pipeline, stage).glob("v*") if (m := _VERSION_RE.match(p.name))]
        return max(nums, default=0) + 1

    def require_root(self) -> None:
        """For commands that inspect a store: a root that does not exist is a mistake, not empty."""
        if not self.root.is_dir():
            raise UsageError(f"artifact root {self.root} does not exist; pass --artifacts DIR (or set GENDD_ARTIFACTS) to an existing store")

    def _dirs(self, folder: Path) -> list[Path]:
        """Real sub-folders (never a symlink), sorted."""
        try:
            return sorted(Path(e.path) for e in os.scandir(folder) if e.is_dir(follow_symlinks=False))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return []

    def _version_dirs(self, pipeline: str | None = None, stage: str | None = None) -> Iterator[Path]:
        if not self.root.is_dir():
            return
        for pdir in self._dirs(self.root):
            if pipeline and pdir.name != pipeline:
                continue
            for sdir in self._dirs(pdir):
                if stage and sdir.name != stage:
                    continue
                for vdir in self._dirs(sdir):
                    if _VERSION_RE.match(vdir.name) and (vdir / MANIFEST).is_file():
                        yield vdir

    def iter_artifacts(self, pipeline: str | None = None, stage: str | None = None) -> Iterator[Artifact]:
        """Published artifacts whose manifests can be trusted; see `broken()` for the others."""
        for vdir in self._version_dirs(pipeline, stage):
            try:
                yield Artifact(vdir, read_manifest(vdir))
            except ArtifactError:
                continue

    def broken(self) -> list[str]:
        """One message per version folder whose manifest is missing, unreadable or untrustworthy."""
        out = []
        for pdir in self._dirs(self.root):
            for sdir in self._dirs(pdir):
                for vdir in self._dirs(sdir):
                    if _VERSION_RE.match(vdir.name) and not (vdir / MANIFEST).is_file():
                        out.append(f"{vdir}: version folder without {MANIFEST}; nothing in it can be checked, delete it and rerun the stage that made it")
        for vdir in self._version_dirs():
            try:
                read_manifest(vdir)
            except ArtifactError as e:
                out.append(str(e))
        return out

    def list(self, pipeline: str | None = None, stage: str | None = None) -> list[Artifact]:
        return list(self.iter_artifacts(pipeline, stage))

    def find(self, pipeline: str, stage: str, fp: str) -> Artifact | None:
        """Newest published version with this fingerprint, if any."""
        hits = [a for a in self.iter_artifacts(pipeline, stage) if a.fingerprint == fp]
        return hits[-1] if hits else None

    def latest(self, pipeline: str, stage: str) -> Artifact | None:
        arts = self.list(pipeline, stage)
        return max(arts, key=lambda a: int(a.version[1:])) if arts else None

    def resolve(self, ident: str) -> Artifact:
        """Find one artifact by 'pipeline/stage/vN', 'stage/vN', 'vN' or a fingerprint prefix."""
        arts = self.list()
        parts = ident.strip("/").split("/")
        if len(parts) == 3:
            hits = [a for a in arts if a.ref == ident.strip("/")]
        elif len(parts) == 2:
            hits = [a for a in arts if (a.stage, a.version) == tuple(parts)]
        elif _VERSION_RE.match(ident):
            hits = [a for a in arts if a.version == ident]
        else:
            hits = [a for a in arts if a.fingerprint.startswith(ident.lower())] if len(ident) >= 6 else []
        if not hits:
            raise UsageError(f"no artifact '{ident}' under {self.root}; list them with 'gendd artifacts ls'")
        if len(hits) > 1:
            raise UsageError(f"'{ident}' matches {len(hits)} artifacts ({', '.join(a.ref for a in hits[:5])}); use pipeline/stage/version")
        return hits[0]

    def by_fingerprint(self, fp: str) -> Artifact | None:
        for a in self.iter_artifacts():
            if a.fingerprint == fp:
                return a
        return None

    def lineage(self, art: Artifact) -> list[Artifact]:
        """The artifact and all its inputs back to the first stage (depth first, no repeats)."""
        seen, order, stack = set(), [], [art]
        while stack:
            a = stack.pop()
            if a.fingerprint in seen:
                continue
            seen.add(a.fingerprint)
            order.append(a)
            for inp in a.manifest.get("inputs", []):
                if "version" in inp:
                    parent = self.find(inp.get("pipeline", a.pipeline), inp["stage"], inp["fingerprint"])
                    if parent is not None:
                        stack.append(parent)
        return order

    def draft(self, pipeline: str, stage: str, fp: str, config: dict, inputs: list[Artifact], extra_inputs: dict | None = None) -> Draft:
        return Draft(self, pipeline, stage, fp, config, inputs, extra_inputs or {})

    def check_input(self, art: Artifact, rebuild_hint: str) -> Artifact:
        """Refuse an input artifact whose files do not match its manifest."""
        problems = verify_artifact(art)
        if problems:
            raise ArtifactError(f"{problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "") + f"; rebuild it: {rebuild_hint}")
        return art

    @contextlib.contextmanager
    def lock(self, pipeline: str, stage: str, fp: str, on_wait=None):
        """Exclusive lock on building (pipeline, stage, fingerprint), across processes on this
        root. `on_wait()` is called once if another process holds it."""
        d = self.stage_dir(pipeline, stage)
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(d / f".lock-{fp[:16]}", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait:
                    on_wait()
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _draft_is_live(self, draft: Path) -> bool:
        try:
            owner = json.loads(draft.with_name(draft.name + OWNER_SUFFIX).read_text())
            pid, host, started = int(owner["pid"]), str(owner["host"]), float(owner["started"])
        except (OSError, ValueError, KeyError, TypeError):
            return False  # no readable owner: a dead draft (the owner file is written first)
        if host != socket.gethostname():
            return time.time() - started < STALE_DRAFT_S
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def leftovers(self) -> list[Path]:
        """Drafts this store created (`.tmp-<12 hex>`, real folders inside the root) whose owner
        process is gone. Nothing else is ever a candidate."""
        if not self.root.is_dir():
            return []
        root = self.root.resolve()
        out = []
        for pdir in self._dirs(self.root):
            for sdir in self._dirs(pdir):
                for d in self._dirs(sdir):
                    if _TMP_RE.match(d.name) and d.resolve().is_relative_to(root) and not self._draft_is_live(d):
                        out.append(d)
        return sorted(out)

    def unreachable(self, keep_fingerprints: set[str] | frozenset = frozenset()) -> list[Artifact]:
        """Versions neither in the lineage of the latest version of any stage nor in the lineage
        of an artifact with one of `keep_fingerprints` (what the current recipes reuse)."""
        keep: set[str] = set()
        arts = self.list()
        for a in arts:
            if a.fingerprint in keep_fingerprints:
                keep.update(x.path.as_posix() for x in self.lineage(a))
        latest: dict[tuple, Artifact] = {}
        for a in arts:
            k = (a.pipeline, a.stage)
            if k not in latest or int(a.version[1:]) > int(latest[k].version[1:]):
                latest[k] = a
        for a in latest.values():
            keep.update(x.path.as_posix() for x in self.lineage(a))
        return [a for a in arts if a.path.as_posix() not in keep]
