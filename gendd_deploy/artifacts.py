"""The artifact store: immutable, versioned, verifiable stage outputs.

Layout: `<root>/<pipeline>/<stage>/<version>/` with payload files and `manifest.json`.
A version is published atomically: files are written into a hidden temporary sibling, the
manifest is written last, then the folder is renamed into place. A folder without a manifest is
never listed; `gc` removes such leftovers. Long stages keep resumable state in a `.work-<fp>`
folder next to the versions, removed once the version is published.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from gendd_deploy.errors import ArtifactError, UsageError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
_VERSION_RE = re.compile(r"^v(\d{3,})$")


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(stage: str, config: dict, inputs: dict[str, str]) -> str:
    """sha256 of stage name, resolved config, input fingerprints and schema version."""
    payload = {"schema": SCHEMA_VERSION, "stage": stage, "config": config, "inputs": dict(sorted(inputs.items()))}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


_HASH_CACHE: dict[tuple, str] = {}


def sha256_file(path: Path) -> str:
    """sha256 of a file, memoised per (path, size, mtime) within this process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


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


def read_manifest(folder: Path) -> dict:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{folder} has no {MANIFEST}; it is not a published artifact") from None
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{folder / MANIFEST} is corrupt ({e}); run 'gendd artifacts verify'") from None


def verify_artifact(art: Artifact) -> list[str]:
    """Re-hash every payload file; return one message per problem (empty = intact)."""
    problems = []
    listed = set()
    for entry in art.manifest.get("files", []):
        rel = entry["path"]
        listed.add(rel)
        p = art.path / rel
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
        if p.is_file() and rel != MANIFEST and rel not in listed:
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
        self.dir.mkdir()
        self.published: Artifact | None = None

    def __enter__(self) -> "Draft":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.published is None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def path(self, name: str) -> Path:
        p = self.dir / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def publish(self) -> Artifact:
        from gendd_deploy.envinfo import environment

        files = []
        for p in sorted(self.dir.rglob("*")):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
                files.append({"path": p.relative_to(self.dir).as_posix(), "bytes": p.stat().st_size, "sha256": sha256_file(p)})
        stage_dir = self.store.stage_dir(self.pipeline, self.stage)
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
            tmp = self.dir / (MANIFEST + ".part")
            tmp.write_text(json.dumps(manifest, indent=2, default=str))
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.dir / MANIFEST)
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

    def iter_artifacts(self, pipeline: str | None = None, stage: str | None = None) -> Iterator[Artifact]:
        if not self.root.is_dir():
            return
        for pdir in sorted(self.root.iterdir()):
            if not pdir.is_dir() or (pipeline and pdir.name != pipeline):
                continue
            for sdir in sorted(pdir.iterdir()):
                if not sdir.is_dir() or (stage and sdir.name != stage):
                    continue
                for vdir in sorted(sdir.iterdir()):
                    if _VERSION_RE.match(vdir.name) and (vdir / MANIFEST).is_file():
                        try:
                            yield Artifact(vdir, read_manifest(vdir))
                        except ArtifactError:
                            continue

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

    def leftovers(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("*/*/.tmp-*") if p.is_dir()) + sorted(
            p for p in self.root.glob("*/*/v*") if p.is_dir() and not (p / MANIFEST).is_file()
        )

    def unreachable(self) -> list[Artifact]:
        """Versions not in the lineage of the latest version of any stage."""
        keep: set[str] = set()
        arts = self.list()
        latest: dict[tuple, Artifact] = {}
        for a in arts:
            k = (a.pipeline, a.stage)
            if k not in latest or int(a.version[1:]) > int(latest[k].version[1:]):
                latest[k] = a
        for a in latest.values():
            keep.update(x.path.as_posix() for x in self.lineage(a))
        return [a for a in arts if a.path.as_posix() not in keep]
