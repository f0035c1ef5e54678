"""Ed25519 signatures over artifact manifests, so native code is loaded only from a trusted builder.

Threat model. The artifact root may be shared: anyone who can write it can replace a payload,
recompute its sha256 and the manifest's digest, and pass `gendd artifacts verify`'s file checks.
For weights, ONNX graphs and arrays that is tampering with results, and every loader refuses to
unpickle or execute them. An AOTInductor package (a shared library) or a TensorRT engine (plugins)
is different: loading it runs native code in the server. A signature proves that the manifest,
and through its sha256 entries every file, is exactly what the holder of a private key published;
it does not prove the builder was honest, and it cannot protect a root whose readers also trust
keys an attacker holds. Keep the private key off the shared root (a CI secret, a file only the
builder reads); distribute the public key to the machines that load.

- `GENDD_SIGNING_KEY`: a PEM Ed25519 private key file. When set, every artifact published is
  signed (`manifest.sig` beside `manifest.json`); `gendd artifacts sign REF...` signs existing ones.
- `GENDD_TRUSTED_KEYS`: PEM Ed25519 public key files, separated by `os.pathsep` (':').
- Loading an `aoti` or `engine` artifact requires a valid signature from a trusted key, unless the
  user passes `--trust-unsigned`. `gendd artifacts verify` reports every artifact's signature.
- `gendd artifacts keygen DIR` writes a key pair (private key mode 0600).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gendd_deploy.errors import ArtifactError, UsageError

SIGNATURE = "manifest.sig"
NATIVE_STAGES = ("aoti", "engine")  # artifacts whose loading runs native code
DOMAIN = b"gendd-manifest-v1:"  # signed message = DOMAIN + manifest digest (hex)
MAX_SIG_BYTES = 4096


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _read_pem(path: Path, kind: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"{kind} {path} cannot be read ({e.strerror}); check the path") from None
    if len(data) > 64 * 1024:
        raise UsageError(f"{kind} {path} is not a PEM key (over 64 KB)")
    return data


def signing_key() -> Ed25519PrivateKey | None:
    """The private key GENDD_SIGNING_KEY names, or None when it is unset."""
    where = os.environ.get("GENDD_SIGNING_KEY")
    if not where:
        return None
    try:
        key = serialization.load_pem_private_key(_read_pem(Path(where), "GENDD_SIGNING_KEY"), password=None)
    except (ValueError, TypeError) as e:
        raise UsageError(f"GENDD_SIGNING_KEY {where} is not an unencrypted PEM private key ({e}); make one with 'gendd artifacts keygen DIR'") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UsageError(f"GENDD_SIGNING_KEY {where} is not an Ed25519 key; make one with 'gendd artifacts keygen DIR'")
    return key


def trusted_keys() -> dict[str, Ed25519PublicKey]:
    """key id -> public key, from the files GENDD_TRUSTED_KEYS lists."""
    out = {}
    for part in filter(None, os.environ.get("GENDD_TRUSTED_KEYS", "").split(os.pathsep)):
        try:
            key = serialization.load_pem_public_key(_read_pem(Path(part), "GENDD_TRUSTED_KEYS entry"))
        except ValueError as e:
            raise UsageError(f"GENDD_TRUSTED_KEYS entry {part} is not a PEM public key ({e})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise UsageError(f"GENDD_TRUSTED_KEYS entry {part} is not an Ed25519 public key")
        out[key_id(key)] = key
    return out


def sign(folder: Path, manifest: dict, key: Ed25519PrivateKey) -> None:
    """Write `folder/manifest.sig` for this manifest (atomically)."""
    digest = manifest["digest"]
    sig = {"alg": "ed25519", "key_id": key_id(key.public_key()), "digest": digest, "signature": base64.b64encode(key.sign(DOMAIN + digest.encode())).decode()}
    tmp = folder / (SIGNATURE + ".part")
    tmp.write_text(json.dumps(sig))
    os.replace(tmp, folder / SIGNATURE)


def status(folder: Path, manifest: dict, keys: dict[str, Ed25519PublicKey]) -> tuple[str, str]:
    """(state, words): state is "trusted", "unsigned", "unknown-key" (signed, by no trusted key)
    or "invalid" (the signature does not match this manifest)."""
    path = folder / SIGNATURE
    if not path.is_file() or path.is_symlink():
        return "unsigned", "unsigned"
    try:
        raw = path.read_bytes()
        if len(raw) > MAX_SIG_BYTES:
            return "invalid", f"{SIGNATURE} is over {MAX_SIG_BYTES} bytes"
        sig = json.loads(raw)
        kid, digest, blob = str(sig["key_id"]), str(sig["digest"]), base64.b64decode(sig["signature"], validate=True)
    except (OSError, ValueError, KeyError, TypeError):
        return "invalid", f"{SIGNATURE} is unreadable"
    if digest != manifest.get("digest"):
        return "invalid", f"{SIGNATURE} signs another manifest (digest {digest[:12]}, manifest {str(manifest.get('digest'))[:12]})"
    if kid not in keys:
        return "unknown-key", f"signed by key {kid}, which is not in GENDD_TRUSTED_KEYS"
    try:
        keys[kid].verify(blob, DOMAIN + digest.encode())
    except InvalidSignature:
        return "invalid", f"{SIGNATURE} does not verify with trusted key {kid}"
    return "trusted", f"signed by trusted key {kid}"


def require_trusted(art, trust_unsigned: bool = False) -> None:
    """Refuse to load native code (aoti, engine) without a valid signature from a trusted key."""
    if art.stage not in NATIVE_STAGES or trust_unsigned:
        return
    state, words = status(art.path, art.manifest, trusted_keys())
    if state != "trusted":
        raise ArtifactError(
            f"{art.ref} holds native code and is {words}; loading it would run that code. Sign it where it was built "
            "(GENDD_SIGNING_KEY, 'gendd artifacts sign') and list the public key in GENDD_TRUSTED_KEYS, or pass --trust-unsigned "
            "if you trust everyone who can write the artifact root"
        )


def keygen(folder: Path) -> tuple[Path, Path]:
    """A new key pair: folder/gendd-signing.pem (mode 0600) and folder/gendd-signing.pub.pem."""
    folder.mkdir(parents=True, exist_ok=True)
    private, public = folder / "gendd-signing.pem", folder / "gendd-signing.pub.pem"
    if private.exists() or public.exists():
        raise UsageError(f"{private} or {public} exists already; pick another folder")
    key = Ed25519PrivateKey.generate()
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public
