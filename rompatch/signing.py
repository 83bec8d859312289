"""Signed patches: who made a patch, on top of what it is.

A patch's content hash (``patch_id``) detects any change to what it holds, but anyone can compute
one, so it proves nothing about who made the patch. A **signature** does: the holder of an ed25519
private key signs the patch id, and whoever has the matching public key, obtained from the signer
and not from the file, checks that the patch is exactly the one signed and was signed by that key.

What is signed (``signed_message``)::

    b"rompatch-signature-v1\\n" + patch_id (64 hex digits, ASCII) + b"\\n" + signer (UTF-8; empty when none)

The prefix keeps a rompatch signature from meaning anything anywhere else; the patch id covers every
hashed field of the patch (docs/patch-format.md); the signer's name is signed too, so it cannot be
changed without breaking the signature. The signature lives in the patch metadata under
``constants.SIGNATURE`` (``"signature"``), compact JSON outside the content hash like an attached
audit, so signing never changes the patch id; a file carries one signature, and signing it again
replaces it::

    {"algorithm": "ed25519", "key_id": "ed25519:<16 hex>", "public_key": "<base64, 32 bytes>",
     "signature": "<base64, 64 bytes>", "signer": "<name>" (optional), "version": 1}

Keys: ``generate_key`` and ``write_keys`` (``rompatch keygen``) make a PKCS#8 PEM private key (file
mode 0600, unencrypted) and ``KEYFILE.pub``, one OpenSSH line ``ssh-ed25519 AAAA… NAME``.
``load_signing_key`` also reads OpenSSH private keys (``ssh-keygen -t ed25519``) and encrypted keys
(passphrase from ``$ROMPATCH_KEY_PASSPHRASE``); ``load_public_keys`` reads OpenSSH lines, PEM public
keys and bare base64 keys (as in a signature's ``public_key``), several per file. A key's id is
``"ed25519:"`` + the first 16 hex digits of the sha256 of its 32 raw bytes.

Needs the ``cryptography`` package (``pip install 'rompatch[signing]'``), imported on first use:
without it signing and verifying raise a one-line ``MissingDependencyError``; ``signature_info``
still describes a signature (without checking it).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import struct
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from .atomic import atomic_write
from .constants import SIGNATURE
from .errors import (
    BadSignatureError,
    KeyFileError,
    MalformedSignatureError,
    MissingDependencyError,
    SignatureError,
    UnsignedPatchError,
    UntrustedKeyError,
)

if TYPE_CHECKING:
    from .patch import Patch

SIGNATURE_VERSION = 1
ALGORITHM = "ed25519"
DOMAIN = b"rompatch-signature-v1\n"  # prefix of every signed message
ENV_PASSPHRASE = "ROMPATCH_KEY_PASSPHRASE"  # passphrase of an encrypted private key
PUBLIC_SUFFIX = ".pub"  # KEYFILE.pub: the public key next to the private one
MAX_SIGNER = 200  # characters of a signer's name
MISSING = "signing needs the 'cryptography' package: pip install 'rompatch[signing]'"
_SSH_TYPE = b"ssh-ed25519"
_PEM_PUBLIC = re.compile(r"-----BEGIN PUBLIC KEY-----.*?-----END PUBLIC KEY-----", re.S)
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _crypto() -> SimpleNamespace:
    """The parts of ``cryptography`` used here, or the one-line error naming the fix."""
    try:
        from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise MissingDependencyError(MISSING) from None
    return SimpleNamespace(
        ed25519=ed25519,
        serialization=serialization,
        InvalidSignature=InvalidSignature,
        UnsupportedAlgorithm=UnsupportedAlgorithm,
    )


def key_id(raw: bytes) -> str:
    """``"ed25519:"`` + the first 16 hex digits of sha256 of the 32-byte public key."""
    return f"{ALGORITHM}:{hashlib.sha256(raw).hexdigest()[:16]}"


def check_signer(signer: str | None) -> str | None:
    """``signer`` stripped, or None for none/empty; refuses a name that is not one printable line."""
    if signer is None:
        return None
    if not isinstance(signer, str):
        raise SignatureError(f"a signer's name must be a string, not {type(signer).__name__}")
    s = signer.strip()
    if len(s) > MAX_SIGNER or not s.isprintable():  # no control, format (bidi) or line separators
        shown = repr(s[:40]) + ("…" if len(s) > 40 else "")
        raise SignatureError(f"signer {shown} must be one line of at most {MAX_SIGNER} printable characters")
    return s or None


def signed_message(patch_id: str, signer: str | None = None) -> bytes:
    """The bytes a signature signs: the domain prefix, the patch id and the signer's name."""
    if not _HEX64.fullmatch(patch_id):
        raise SignatureError(f"{patch_id!r} is not a patch id (64 hex digits)")
    return DOMAIN + patch_id.encode("ascii") + b"\n" + (signer or "").encode("utf-8")


# ------------------------------------------------------------------------------------------ keys


@dataclass(frozen=True)
class PublicKey:
    """An ed25519 public key. ``name``: its label (the comment of its key file line, the signer);
    ``source``: the file it was read from. Keys compare by their bytes only."""

    raw: bytes
    name: str | None = field(default=None, compare=False)
    source: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.raw, bytes) or len(self.raw) != 32:
            size = f"{len(self.raw)} bytes" if isinstance(self.raw, bytes) else type(self.raw).__name__
            raise KeyFileError(f"an ed25519 public key is 32 bytes, not {size}")

    @property
    def key_id(self) -> str:
        return key_id(self.raw)

    @property
    def base64(self) -> str:
        return base64.b64encode(self.raw).decode("ascii")

    @property
    def label(self) -> str:
        """How to call this key in a message: its name, else its file, else its id."""
        return self.name or self.source or self.key_id

    def openssh(self) -> str:
        """The key as one OpenSSH line, ``ssh-ed25519 AAAA… [name]`` (as in ``KEYFILE.pub``)."""
        blob = _ssh_string(_SSH_TYPE) + _ssh_string(self.raw)
        line = f"{_SSH_TYPE.decode()} {base64.b64encode(blob).decode('ascii')}"
        return f"{line} {self.name}" if self.name else line


@dataclass
class SigningKey:
    """An ed25519 private key (a ``cryptography`` object) and the signer's name it signs with."""

    private: Any
    signer: str | None = None
    source: str | None = None

    @property
    def public(self) -> PublicKey:
        ser = _crypto().serialization
        raw = self.private.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
        return PublicKey(raw, name=self.signer, source=self.source and self.source + PUBLIC_SUFFIX)

    @property
    def key_id(self) -> str:
        return self.public.key_id

    def sign(self, message: bytes) -> bytes:
        return self.private.sign(message)

    def private_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM (``-----BEGIN PRIVATE KEY-----``)."""
        ser = _crypto().serialization
        return self.private.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())


def _ssh_string(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def _ssh_blob_key(blob: bytes) -> bytes | None:
    """The 32 key bytes of an OpenSSH ed25519 public key blob, or None if it is not one."""
    fields, i = [], 0
    while i < len(blob) and len(fields) < 3:
        if i + 4 > len(blob):
            return None
        (n,) = struct.unpack(">I", blob[i : i + 4])
        fields.append(blob[i + 4 : i + 4 + n])
        i += 4 + n
    if i != len(blob) or len(fields) != 2 or fields[0] != _SSH_TYPE or len(fields[1]) != 32:
        return None
    return fields[1]


def generate_key(signer: str | None = None) -> SigningKey:
    """A new random ed25519 key, signing as ``signer`` (a name or e-mail address; optional)."""
    return SigningKey(_crypto().ed25519.Ed25519PrivateKey.generate(), signer=check_signer(signer))


def public_key_path(path: str | os.PathLike) -> Path:
    """``KEYFILE.pub``: where the public key of the private key file ``path`` is kept."""
    return Path(f"{os.fspath(path)}{PUBLIC_SUFFIX}")


def write_keys(key: SigningKey, path: str | os.PathLike, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``key``'s private key to ``path`` (PKCS#8 PEM, mode 0600) and its public key to
    ``path.pub`` (one OpenSSH line with the signer's name as comment). Returns both paths.

    Each file is written atomically; an existing key file is never replaced unless ``overwrite``
    (a replaced private key is lost for good)."""
    path = Path(path).expanduser()
    pub = public_key_path(path)
    if not overwrite:
        for p in (path, pub):
            if p.exists() or p.is_symlink():
                raise KeyFileError(
                    f"{p} already exists; a replaced private key is lost for good, so pick another name "
                    "(or pass --force to replace it)"
                )
    if path.is_dir():
        raise KeyFileError(f"{path} is a folder; pass a file name for the private key")
    _write_private(path, key.private_pem(), overwrite=overwrite)
    atomic_write(pub, lambda tmp: Path(tmp).write_text(key.public.openssh() + "\n"))
    return path, pub


def _write_private(path: Path, data: bytes, *, overwrite: bool) -> None:
    """``data`` into ``path`` with mode 0600 from the start, through a temporary file renamed (or,
    without ``overwrite``, hard-linked: an existing file is never replaced) into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise KeyFileError(f"{path} already exists; pick another name (or pass --force)") from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def _read(path: str | os.PathLike, what: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such {what} file") from None
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read the {what} file ({e.strerror or e})") from None


def load_signing_key(
    path: str | os.PathLike, *, signer: str | None = None, passphrase: str | bytes | None = None
) -> SigningKey:
    """The ed25519 private key in ``path``: PKCS#8 PEM (``rompatch keygen``, ``openssl genpkey -algorithm
    ed25519``) or OpenSSH (``ssh-keygen -t ed25519``). An encrypted key needs ``passphrase`` (default
    ``$ROMPATCH_KEY_PASSPHRASE``).

    The signer's name is ``signer``, else the comment of ``path.pub`` when that file holds this key's
    public key, else none."""
    c = _crypto()
    data = _read(path, "private key")
    if b"PRIVATE KEY-----" not in data:
        if b"PUBLIC KEY-----" in data or data.lstrip().startswith(_SSH_TYPE):
            raise KeyFileError(
                f"{path} is a public key; signing needs the private key (the file without .pub)"
            )
        raise KeyFileError(f"{path} is not a PEM or OpenSSH private key; make one with `rompatch keygen`")
    if passphrase is None:
        passphrase = os.environ.get(ENV_PASSPHRASE) or None
    password = passphrase.encode() if isinstance(passphrase, str) else passphrase
    load = (
        c.serialization.load_ssh_private_key
        if b"OPENSSH PRIVATE KEY" in data
        else c.serialization.load_pem_private_key
    )
    private = _load_private(load, data, password, path)
    if not isinstance(private, c.ed25519.Ed25519PrivateKey):
        raise KeyFileError(
            f"{path} is not an ed25519 key ({type(private).__name__.lstrip('_')}); rompatch signs with ed25519 keys only "
            "(`rompatch keygen`, or `ssh-keygen -t ed25519`)"
        )
    key = SigningKey(private, source=str(path))
    if signer is None:
        signer = _name_in_public_file(public_key_path(path), key.public)
    key.signer = check_signer(signer)
    return key


def _load_private(load: Any, data: bytes, password: bytes | None, path: str | os.PathLike) -> Any:
    """``load(data, password)`` (a ``cryptography`` loader), its failures as one-line ``KeyFileError``s."""
    c = _crypto()
    try:
        return load(data, password)
    except TypeError:  # no passphrase for an encrypted key, or one for a key that is not encrypted
        if password is None:
            raise KeyFileError(f"{path} is encrypted; set {ENV_PASSPHRASE} to its passphrase") from None
        return _load_private(load, data, None, path)
    except c.UnsupportedAlgorithm as e:
        if "bcrypt" in str(e):
            raise KeyFileError(
                f"{path}: an encrypted OpenSSH key needs the 'bcrypt' package (pip install bcrypt), "
                "or remove its passphrase (ssh-keygen -p)"
            ) from None
        raise KeyFileError(f"{path}: {e}; rompatch signs with ed25519 keys only") from None
    except ValueError as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        hint = f"wrong passphrase in {ENV_PASSPHRASE}, or " if password else ""
        raise KeyFileError(
            f"{path}: cannot load the private key ({detail}); {hint}the file is corrupt"
        ) from None


def _name_in_public_file(pub: Path, public: PublicKey) -> str | None:
    """The comment of ``pub``'s line for ``public``; None when there is no such file or line."""
    if not pub.is_file():
        return None
    try:
        keys = load_public_keys(pub)
    except SignatureError:
        return None
    return next((k.name for k in keys if k == public and k.name), None)


def load_public_keys(path: str | os.PathLike) -> list[PublicKey]:
    """The ed25519 public keys in ``path``: PEM public keys (``-----BEGIN PUBLIC KEY-----``), or lines
    ``ssh-ed25519 AAAA… [name]`` (``KEYFILE.pub``, ``ssh-keygen``) or ``BASE64 [name]`` (the 32 raw
    bytes, as in a signature's ``public_key``); blank lines and ``#`` comments are skipped."""
    data = _read(path, "public key")
    src = str(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise KeyFileError(f"{path} is not a text file; expected a public key such as KEYFILE.pub") from None
    if "PRIVATE KEY-----" in text:
        raise KeyFileError(
            f"{path} is a private key; pass its public key ({path}{PUBLIC_SUFFIX}), and keep the private key to yourself"
        )
    if "-----BEGIN PUBLIC KEY-----" in text:
        return [_pem_public(m.group(0), src) for m in _PEM_PUBLIC.finditer(text)]
    keys = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keys.append(_public_line(line, f"{path}:{n}", src))
    if not keys:
        raise KeyFileError(f"{path} holds no public key")
    return keys


def _public_line(line: str, where: str, src: str) -> PublicKey:
    parts = line.split(None, 2)
    if parts[0] == _SSH_TYPE.decode():
        raw = _ssh_blob_key(_b64(parts[1]) or b"") if len(parts) > 1 else None
        name = parts[2].strip() if len(parts) > 2 else None
    elif parts[0].startswith(("ssh-", "ecdsa-", "sk-")):
        raise KeyFileError(f"{where}: {parts[0]} is not ed25519; rompatch verifies ed25519 keys only")
    else:
        parts = line.split(None, 1)
        raw = _b64(parts[0])
        name = parts[1].strip() if len(parts) > 1 else None
    if raw is None or len(raw) != 32:
        raise KeyFileError(
            f"{where}: not an ed25519 public key (expected 'ssh-ed25519 AAAA… [name]', a PEM public key "
            "or the key's 32 bytes in base64)"
        )
    return PublicKey(raw, name=name or None, source=src)


def _pem_public(pem: str, src: str) -> PublicKey:
    c = _crypto()
    try:
        key = c.serialization.load_pem_public_key(pem.encode())
    except (ValueError, c.UnsupportedAlgorithm) as e:
        raise KeyFileError(
            f"{src}: not a readable PEM public key ({str(e).splitlines()[0] if str(e) else e})"
        ) from None
    if not isinstance(key, c.ed25519.Ed25519PublicKey):
        raise KeyFileError(
            f"{src}: not an ed25519 key ({type(key).__name__.lstrip('_')}); rompatch verifies ed25519 keys only"
        )
    raw = key.public_bytes(c.serialization.Encoding.Raw, c.serialization.PublicFormat.Raw)
    return PublicKey(raw, source=src)


def _b64(s: str) -> bytes | None:
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        return None


TrustedKey = str | os.PathLike | PublicKey | bytes
TrustedKeys = TrustedKey | Iterable[TrustedKey]


def trusted_keys(keys: TrustedKeys) -> list[PublicKey]:
    """``keys`` as a list of public keys: public key files (paths), ``PublicKey`` objects or raw
    32-byte keys, one or a sequence of them. Refuses an empty set."""
    items: Sequence[Any] = [keys] if isinstance(keys, (str, os.PathLike, PublicKey, bytes)) else list(keys)
    out: list[PublicKey] = []
    for k in items:
        if isinstance(k, PublicKey):
            out.append(k)
        elif isinstance(k, bytes):
            out.append(PublicKey(k))
        elif isinstance(k, (str, os.PathLike)):
            out += load_public_keys(k)
        else:
            raise SignatureError(
                f"a trusted key is a public key file, a PublicKey or 32 bytes, not {type(k).__name__}"
            )
    if not out:
        raise SignatureError("no trusted public keys given; pass at least one public key file")
    return out


# ------------------------------------------------------------------------------------ signatures


@dataclass(frozen=True)
class Signature:
    """A signature entry as stored in a patch's metadata (``constants.SIGNATURE``)."""

    public_key: PublicKey
    signature: bytes
    signer: str | None = None

    @property
    def key_id(self) -> str:
        return self.public_key.key_id

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "version": SIGNATURE_VERSION,
            "algorithm": ALGORITHM,
            "key_id": self.key_id,
            "public_key": self.public_key.base64,
            "signature": base64.b64encode(self.signature).decode("ascii"),
        }
        if self.signer is not None:
            d["signer"] = self.signer
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def parse(cls, raw: str, *, where: str = "patch") -> Signature:
        """Parse a metadata value; ``MalformedSignatureError`` naming what is wrong."""

        def bad(why: str, kid: str | None = None) -> MalformedSignatureError:
            return MalformedSignatureError(
                f"{where}: the signature metadata is malformed ({why}); sign the patch again", key_id=kid
            )

        try:
            d = json.loads(raw)
        except (TypeError, ValueError):
            raise bad("not JSON") from None
        if not isinstance(d, dict):
            raise bad("not a JSON object")
        if d.get("version") != SIGNATURE_VERSION:
            raise bad(f"version {d.get('version')!r}, this rompatch reads version {SIGNATURE_VERSION}")
        if d.get("algorithm") != ALGORITHM:
            raise bad(f"algorithm {d.get('algorithm')!r}, expected '{ALGORITHM}'")
        unknown = sorted(set(d) - {"version", "algorithm", "key_id", "public_key", "signature", "signer"})
        if unknown:
            raise bad(f"unknown field(s) {', '.join(map(str, unknown))}")
        pub = _b64(d["public_key"]) if isinstance(d.get("public_key"), str) else None
        if pub is None or len(pub) != 32:
            raise bad("'public_key' must be 32 bytes in base64")
        kid = key_id(pub)
        if d.get("key_id") != kid:
            raise bad(f"'key_id' {d.get('key_id')!r} is not the id of its public key, {kid}", kid)
        sig = _b64(d["signature"]) if isinstance(d.get("signature"), str) else None
        if sig is None or len(sig) != 64:
            raise bad("'signature' must be 64 bytes in base64", kid)
        signer = d.get("signer")
        if signer is not None and (not isinstance(signer, str) or check_signer_ok(signer) != signer):
            raise bad("'signer' must be a non-empty line of printable characters", kid)
        return cls(PublicKey(pub, name=signer), sig, signer)


def check_signer_ok(signer: str) -> str | None:
    """``check_signer`` without raising: the cleaned name, or None when it is not acceptable."""
    try:
        return check_signer(signer)
    except SignatureError:
        return None


def read_signature(patch: Patch) -> Signature | None:
    """The signature entry ``patch`` carries, parsed (not checked); None when it carries none."""
    raw = patch.extra.get(SIGNATURE)
    return None if raw is None else Signature.parse(raw, where=f"patch {patch.short_id}")


def _verifies(sig: Signature, patch_id: str) -> bool:
    c = _crypto()
    public = c.ed25519.Ed25519PublicKey.from_public_bytes(sig.public_key.raw)
    try:
        public.verify(sig.signature, signed_message(patch_id, sig.signer))
    except c.InvalidSignature:
        return False
    return True


def sign_patch(patch: Patch, key: SigningKey | str | os.PathLike, *, signer: str | None = None) -> Patch:
    """Sign ``patch`` (its id, with ``signer``'s name, else the key's) and store the signature in its
    metadata, replacing any earlier one. Returns ``patch``; its id does not change. Save it with
    ``save_patch``. ``key``: a ``SigningKey`` or a private key file (``load_signing_key``)."""
    if not isinstance(key, SigningKey):
        key = load_signing_key(key)
    name = check_signer(signer) if signer is not None else key.signer
    pid = patch.id
    sig = Signature(PublicKey(key.public.raw, name=name), key.sign(signed_message(pid, name)), name)
    patch.extra[SIGNATURE] = sig.to_json()
    return patch


@dataclass(frozen=True)
class Verified:
    """A good signature by a trusted key: the patch, the signing key's id, the signer's name as
    signed, and the trusted key it matched (its ``label``: the name in the verifier's key file)."""

    patch_id: str
    key_id: str
    signer: str | None
    trusted: PublicKey

    def describe(self) -> str:
        who = self.signer or "an unnamed signer"
        also = f", trusted as {self.trusted.label}" if self.trusted.label != self.signer else ""
        return f"good signature by {who} (key {self.key_id}{also})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "patch_id": self.patch_id,
            "key_id": self.key_id,
            "signer": self.signer,
            "trusted_as": self.trusted.label,
        }


def verify_signature(patch: Patch, trusted: TrustedKeys) -> Verified:
    """Check that ``patch`` carries a signature of itself by one of the ``trusted`` keys (see
    ``trusted_keys``) and return who signed it. Raises, each with a one-line message:
    ``UnsignedPatchError`` (no signature), ``MalformedSignatureError`` (unreadable entry),
    ``BadSignatureError`` (it does not verify for this patch: made for another patch, altered or
    forged) or ``UntrustedKeyError`` (a good signature by a key not among ``trusted``)."""
    keys = trusted_keys(trusted)
    pid = patch.id
    sig = read_signature(patch)
    if sig is None:
        raise UnsignedPatchError(
            f"patch {pid[:12]} is not signed, and a signature by a trusted key is required; "
            "ask its author to sign it (rompatch sign)",
            patch_id=pid,
        )
    if not _verifies(sig, pid):
        raise BadSignatureError(
            f"patch {pid[:12]}: its signature (key {sig.key_id}) does not verify for this patch: it was made "
            "for another patch, or altered or forged; do not use it",
            patch_id=pid,
            key_id=sig.key_id,
        )
    match = next((k for k in keys if k == sig.public_key), None)
    if match is None:
        who = f" ({sig.signer})" if sig.signer else ""
        raise UntrustedKeyError(
            f"patch {pid[:12]} is signed by key {sig.key_id}{who}, which is not among the trusted keys "
            f"({', '.join(k.key_id for k in keys)})",
            patch_id=pid,
            key_id=sig.key_id,
        )
    return Verified(pid, sig.key_id, sig.signer, match)


def require_signed(patches: Iterable[Patch], trusted: TrustedKeys) -> list[Verified]:
    """``verify_signature`` for each patch, in order, against one set of trusted keys (loaded once);
    the first failure raises. Used by ``apply_to_checkpoint`` and ``load_patched``
    (``require_signature=``) before anything is written or loaded."""
    keys = trusted_keys(trusted)
    return [verify_signature(p, keys) for p in patches]


# ------------------------------------------------------------------------------------ describing


def signature_info(patch: Patch) -> dict[str, Any] | None:
    """A description of the signature ``patch`` carries, for ``rompatch show`` and model cards; None
    when it carries none. Never raises for a bad entry: ``error`` says what is wrong.

    Keys: ``key_id``, ``signer`` (as signed), ``public_key`` (base64), ``verifies`` (True when the
    signature is of this patch by the embedded key, False when not, None when it could not be checked:
    no ``cryptography``) and ``error`` (None, or why it does not verify or could not be read). That it
    verifies says nothing about who holds the key: ``verify_signature`` checks it against trusted keys.
    """
    if patch.extra.get(SIGNATURE) is None:
        return None
    try:
        sig = read_signature(patch)
    except MalformedSignatureError as e:
        return {"key_id": e.key_id, "signer": None, "public_key": None, "verifies": False, "error": str(e)}
    assert sig is not None
    info: dict[str, Any] = {
        "key_id": sig.key_id,
        "signer": sig.signer,
        "public_key": sig.public_key.base64,
        "verifies": None,
        "error": None,
    }
    try:
        info["verifies"] = _verifies(sig, patch.id)
    except MissingDependencyError as e:
        info["error"] = str(e)
    else:
        if not info["verifies"]:
            info["error"] = (
                "the signature does not verify for this patch (made for another patch, or altered)"
            )
    return info


def describe_signature(info: dict[str, Any] | None) -> str:
    """One line for ``signature_info``'s result: 'Alice (key ed25519:…), the signature verifies for
    this patch' (or 'not signed', or what is wrong)."""
    if info is None:
        return "not signed"
    if info["key_id"] is None:
        return f"malformed signature: {info['error']}"
    who = f"{info['signer']} (key {info['key_id']})" if info["signer"] else f"key {info['key_id']}"
    if info["verifies"] is True:
        return f"{who}; the signature verifies for this patch (check the key: rompatch verify --key)"
    if info["verifies"] is False:
        return f"{who}; INVALID: {info['error']}"
    return f"{who}; not checked ({info['error']})"
