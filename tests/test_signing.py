"""Signed patches (rompatch.signing, `rompatch keygen | sign | verify`, `apply --require-signature`):
who made a patch, checked against trusted public keys; every way to get it wrong is refused."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import sys

import pytest
import torch
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed448, ed25519
from safetensors import safe_open
from safetensors.torch import save_file

from rompatch.checkpoint.operations import apply_to_checkpoint, checkpoint_log
from rompatch.cli.main import cli
from rompatch.constants import AUDIT, SIGNATURE
from rompatch.errors import (
    BadSignatureError,
    KeyFileError,
    MalformedSignatureError,
    MissingDependencyError,
    PatchFormatError,
    RompatchError,
    SignatureError,
    UnsignedPatchError,
    UntrustedKeyError,
)
from rompatch.hub.modelcard import render_body
from rompatch.loading import load_patched
from rompatch.patch import load_patch, save_patch
from rompatch.signing import (
    DOMAIN,
    ENV_PASSPHRASE,
    MISSING,
    PublicKey,
    Signature,
    SigningKey,
    generate_key,
    key_id,
    load_public_keys,
    load_signing_key,
    require_signed,
    sign_patch,
    signature_info,
    signed_message,
    trusted_keys,
    verify_signature,
    write_keys,
)
from tests.helpers import vector_patch
from tests.helpers.ckpt import file_shas, leftovers, make_ckpt
from tests.helpers.tiny import make_model
from tests.helpers.tiny_folder import save_tiny


@pytest.fixture(scope="module")
def model():
    return make_model("llama")


@pytest.fixture
def patch(model):
    return vector_patch(model, layer=1, n=2)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Alice's and Mallory's key files (private KEYFILE and KEYFILE.pub), made by write_keys."""
    root = tmp_path_factory.mktemp("keys")
    alice = generate_key("Alice <alice@example.com>")
    mallory = generate_key("Mallory")
    write_keys(alice, root / "alice.key")
    write_keys(mallory, root / "mallory.key")
    return {
        "alice": alice,
        "mallory": mallory,
        "alice.key": root / "alice.key",
        "alice.pub": root / "alice.key.pub",
        "mallory.key": root / "mallory.key",
        "mallory.pub": root / "mallory.key.pub",
    }


def _raw(path):
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def _entry(p) -> dict:
    return json.loads(p.extra[SIGNATURE])


def _with_entry(p, **changes):
    """``p`` with its signature entry's fields changed (None removes one)."""
    d = {**_entry(p), **changes}
    p.extra[SIGNATURE] = json.dumps({k: v for k, v in d.items() if v is not None})
    return p


# ------------------------------------------------------------------------------------ the library


def test_signing_keeps_the_patch_id_and_stores_one_compact_entry(tmp_path, patch, keys):
    pid = patch.id
    path = save_patch(sign_patch(patch, keys["alice"]), tmp_path / "p.safetensors")
    back = load_patch(path)
    assert back.id == pid and _raw(path)[0]["patch_id"] == pid
    raw = back.extra[SIGNATURE]
    entry = json.loads(raw)
    assert raw == json.dumps(entry, sort_keys=True, separators=(",", ":"))  # compact JSON
    pub = keys["alice"].public.raw
    assert entry["version"] == 1 and entry["algorithm"] == "ed25519"
    assert entry["key_id"] == key_id(pub) == "ed25519:" + hashlib.sha256(pub).hexdigest()[:16]
    assert base64.b64decode(entry["public_key"]) == pub and entry["signer"] == "Alice <alice@example.com>"
    # The signature is ed25519 over the documented message: domain prefix, patch id, signer.
    message = DOMAIN + pid.encode() + b"\n" + b"Alice <alice@example.com>"
    assert signed_message(pid, "Alice <alice@example.com>") == message
    ed25519.Ed25519PublicKey.from_public_bytes(pub).verify(base64.b64decode(entry["signature"]), message)
    v = verify_signature(back, keys["alice.pub"])
    assert (v.patch_id, v.key_id, v.signer) == (pid, entry["key_id"], "Alice <alice@example.com>")
    assert v.describe() == f"good signature by Alice <alice@example.com> (key {entry['key_id']})"


def test_unsigned_and_wrong_key_are_refused(patch, keys):
    with pytest.raises(UnsignedPatchError, match=rf"patch {patch.short_id} is not signed") as e:
        verify_signature(patch, keys["alice.pub"])
    assert e.value.patch_id == patch.id and isinstance(e.value, ValueError)
    sign_patch(patch, keys["alice"])
    with pytest.raises(UntrustedKeyError, match=r"signed by key ed25519:\w{16} \(Alice <alice@example.com>\), which is not among the trusted keys") as e:  # fmt: skip
        verify_signature(patch, keys["mallory.pub"])
    assert e.value.key_id == keys["alice"].key_id
    # Any one trusted key is enough; the trusted key's own label is reported.
    v = verify_signature(patch, [keys["mallory.pub"], keys["alice.pub"]])
    assert v.trusted.source == str(keys["alice.pub"])


def test_changed_tensor_is_refused_on_load_and_a_recomputed_id_breaks_the_signature(tmp_path, patch, keys):
    path = save_patch(sign_patch(patch, keys["alice"]), tmp_path / "p.safetensors")
    meta, tensors = _raw(path)
    tensors["deltas.0.v"] = tensors["deltas.0.v"].clone()
    tensors["deltas.0.v"][0] += 1.0
    save_file(tensors, str(tmp_path / "tampered.safetensors"), metadata=meta)
    with pytest.raises(PatchFormatError, match="does not match the recorded patch_id"):
        load_patch(tmp_path / "tampered.safetensors")
    # A forger who also rewrites patch_id gets a loadable file, whose signature no longer verifies.
    forged = load_patch(tmp_path / "tampered.safetensors", verify_id=False)
    meta["patch_id"] = forged.id
    save_file(tensors, str(tmp_path / "forged.safetensors"), metadata=meta)
    loaded = load_patch(tmp_path / "forged.safetensors")
    assert loaded.id != patch.id
    with pytest.raises(
        BadSignatureError, match=rf"patch {loaded.short_id}: its signature .* does not verify"
    ):
        verify_signature(loaded, keys["alice.pub"])
    assert signature_info(loaded)["verifies"] is False


def test_a_signature_moved_from_another_patch_is_refused(model, patch, keys):
    other = sign_patch(vector_patch(model, layer=2, seed=5), keys["alice"])
    assert verify_signature(other, keys["alice.pub"]).patch_id == other.id
    patch.extra[SIGNATURE] = other.extra[SIGNATURE]
    with pytest.raises(BadSignatureError, match="made for another patch"):
        verify_signature(patch, keys["alice.pub"])


def test_forged_entries_are_refused(patch, keys):
    sign_patch(patch, keys["alice"])
    good = dict(_entry(patch))
    # The signer's name is signed: changing it breaks the signature.
    with pytest.raises(BadSignatureError):
        verify_signature(_with_entry(patch, signer="Bob"), keys["alice.pub"])
    # Removing it too.
    with pytest.raises(BadSignatureError):
        verify_signature(_with_entry(patch, **{**good, "signer": None}), keys["alice.pub"])
    # Alice's key with bytes that are not her signature.
    with pytest.raises(BadSignatureError):
        verify_signature(_with_entry(patch, **{**good, "signature": base64.b64encode(bytes(64)).decode()}), keys["alice.pub"])  # fmt: skip
    # Mallory's own good signature, claiming to be Alice: a good signature, by an untrusted key.
    sign_patch(patch, keys["mallory"], signer="Alice <alice@example.com>")
    with pytest.raises(UntrustedKeyError):
        verify_signature(patch, keys["alice.pub"])
    # Mallory's signature under Alice's key id: the id must be its public key's.
    with pytest.raises(MalformedSignatureError, match="is not the id of its public key"):
        verify_signature(_with_entry(patch, key_id=good["key_id"]), keys["alice.pub"])


@pytest.mark.parametrize(
    "raw, match",
    [
        ("not json", "not JSON"),
        ("[1]", "not a JSON object"),
        ('{"version": 2}', "version 2"),
        ("{}", "version None"),
    ],
)
def test_malformed_metadata_is_refused(patch, keys, raw, match):
    patch.extra[SIGNATURE] = raw
    with pytest.raises(MalformedSignatureError, match=rf"patch {patch.short_id}: the signature metadata is malformed \(.*{match}"):  # fmt: skip
        verify_signature(patch, keys["alice.pub"])
    info = signature_info(patch)
    assert info["verifies"] is False and "malformed" in info["error"]


@pytest.mark.parametrize(
    "change, match",
    [
        ({"algorithm": "rsa"}, "algorithm 'rsa'"),
        ({"public_key": "AAAA"}, "'public_key' must be 32 bytes"),
        ({"public_key": "not base64!"}, "'public_key' must be 32 bytes"),
        ({"signature": "AAAA"}, "'signature' must be 64 bytes"),
        ({"signature": None}, "'signature' must be 64 bytes"),
        ({"key_id": None}, "'key_id' None is not the id"),
        ({"signer": ""}, "'signer' must be"),
        ({"signer": "a\nb"}, "'signer' must be"),
        ({"signer": 7}, "'signer' must be"),
        ({"extra": 1}, "unknown field"),
    ],
)
def test_malformed_fields_are_refused(patch, keys, change, match):
    sign_patch(patch, keys["alice"])
    with pytest.raises(MalformedSignatureError, match=match):
        verify_signature(_with_entry(patch, **change), keys["alice.pub"])


def test_resigning_replaces_the_signature(tmp_path, patch, keys):
    path = save_patch(sign_patch(patch, keys["alice"]), tmp_path / "p.safetensors")
    p = sign_patch(load_patch(path), keys["mallory"])
    save_patch(p, path)
    back = load_patch(path)
    assert _entry(back)["key_id"] == keys["mallory"].key_id and _entry(back)["signer"] == "Mallory"
    assert verify_signature(back, keys["mallory.pub"]).signer == "Mallory"
    with pytest.raises(UntrustedKeyError):
        verify_signature(back, keys["alice.pub"])


def test_annotations_outside_the_hash_do_not_touch_the_signature(patch, keys):
    """An attached audit (like every key outside the content hash) is not signed: adding or changing
    one leaves the signature good, and the signature says nothing about it."""
    sign_patch(patch, keys["alice"])
    patch.extra[AUDIT] = json.dumps({"patch_id": patch.id, "summary": {"verdict": "pass"}})
    patch.created_at = "2000-01-01T00:00:00+00:00"
    assert verify_signature(patch, keys["alice.pub"]).signer == "Alice <alice@example.com>"


def test_signature_info_describes_without_trusting(patch, keys):
    assert signature_info(patch) is None
    sign_patch(patch, keys["mallory"])
    info = signature_info(patch)
    assert info == {
        "key_id": keys["mallory"].key_id,
        "signer": "Mallory",
        "public_key": keys["mallory"].public.base64,
        "verifies": True,
        "error": None,
    }


def test_require_signed_checks_every_patch(model, patch, keys):
    a = sign_patch(patch, keys["alice"])
    b = vector_patch(model, layer=2, seed=3)
    assert [v.patch_id for v in require_signed([a], keys["alice.pub"])] == [a.id]
    with pytest.raises(UnsignedPatchError, match=b.short_id):
        require_signed([a, b], keys["alice.pub"])
    with pytest.raises(SignatureError, match="no trusted public keys given"):
        require_signed([a], [])


def test_without_cryptography_one_line_error(monkeypatch, patch, keys):
    sign_patch(patch, keys["alice"])
    public = keys["alice"].public
    for name in [m for m in sys.modules if m == "cryptography" or m.startswith("cryptography.")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed
    with pytest.raises(MissingDependencyError) as e:
        generate_key()
    assert (
        str(e.value) == MISSING == "signing needs the 'cryptography' package: pip install 'rompatch[signing]'"
    )
    with pytest.raises(MissingDependencyError):
        verify_signature(patch, keys["alice.pub"])
    # Describing still works, unchecked; OpenSSH and base64 public keys need no cryptography.
    info = signature_info(patch)
    assert (
        info["signer"] == "Alice <alice@example.com>"
        and info["verifies"] is None
        and info["error"] == MISSING
    )
    assert load_public_keys(keys["alice.pub"]) == [public]


# ------------------------------------------------------------------------------------------ keys


def test_key_files_permissions_and_no_silent_replacement(tmp_path):
    old = os.umask(0)  # even with a permissive umask the private key is 0600
    try:
        key = generate_key("Alice")
        private, public = write_keys(key, tmp_path / "k")
    finally:
        os.umask(old)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public == tmp_path / "k.pub" and public.read_text() == key.public.openssh() + "\n"
    assert public.read_text().startswith("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5") and public.read_text().endswith(
        " Alice\n"
    )
    with pytest.raises(KeyFileError, match="already exists"):
        write_keys(generate_key(), tmp_path / "k")
    assert load_signing_key(private).key_id == key.key_id  # untouched
    other = generate_key()
    write_keys(other, tmp_path / "k", overwrite=True)
    assert load_signing_key(private).key_id == other.key_id
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k", "k.pub"]  # no temporary files left


def test_signer_comes_from_the_public_key_file_or_the_option(tmp_path, keys):
    assert load_signing_key(keys["alice.key"]).signer == "Alice <alice@example.com>"
    assert load_signing_key(keys["alice.key"], signer="A. Liddell").signer == "A. Liddell"
    (tmp_path / "alone.key").write_bytes(keys["alice.key"].read_bytes())
    assert load_signing_key(tmp_path / "alone.key").signer is None  # no alone.key.pub
    (tmp_path / "alone.key.pub").write_text(keys["mallory"].public.openssh() + "\n")
    assert load_signing_key(tmp_path / "alone.key").signer is None  # a .pub of another key
    for bad in ("two\nlines", "evil\u202egnp.exe", "x" * 201):
        with pytest.raises(SignatureError, match="one line of at most 200 printable characters"):
            generate_key(bad)


def test_openssh_pem_and_base64_key_formats(tmp_path, patch):
    """Keys from ssh-keygen (OpenSSH private key and .pub line) and PEM/base64 public keys work."""
    private = ed25519.Ed25519PrivateKey.generate()
    ssh_private = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    ssh_public = private.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    (tmp_path / "id_ed25519").write_bytes(ssh_private)
    (tmp_path / "id_ed25519.pub").write_text(ssh_public.decode() + " carol@laptop\n")
    key = load_signing_key(tmp_path / "id_ed25519")
    assert key.signer == "carol@laptop"
    sign_patch(patch, key)
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "carol.pem").write_bytes(pem)
    raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    (tmp_path / "team.keys").write_text(
        f"# the team's keys\n\n{generate_key().public.openssh()}\n{base64.b64encode(raw).decode()} Carol\n"
    )
    for f in ("id_ed25519.pub", "carol.pem", "team.keys"):
        assert verify_signature(patch, tmp_path / f).signer == "carol@laptop", f
    assert [k.name for k in load_public_keys(tmp_path / "team.keys")] == [None, "Carol"]
    assert verify_signature(patch, tmp_path / "team.keys").trusted.label == "Carol"
    assert verify_signature(patch, PublicKey(raw)).key_id == key_id(raw)
    assert trusted_keys(raw) == [PublicKey(raw)]


def test_encrypted_private_key_reads_the_passphrase_from_the_environment(tmp_path, monkeypatch):
    private = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "enc.key").write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"correct horse"),
        )
    )
    monkeypatch.delenv(ENV_PASSPHRASE, raising=False)
    with pytest.raises(KeyFileError, match=f"enc.key is encrypted; set {ENV_PASSPHRASE}"):
        load_signing_key(tmp_path / "enc.key")
    monkeypatch.setenv(ENV_PASSPHRASE, "wrong")
    with pytest.raises(KeyFileError, match="cannot load the private key .*wrong passphrase"):
        load_signing_key(tmp_path / "enc.key")
    monkeypatch.setenv(ENV_PASSPHRASE, "correct horse")
    assert isinstance(load_signing_key(tmp_path / "enc.key"), SigningKey)


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "holds no public key"),
        ("# only a comment\n", "holds no public key"),
        (
            "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ x\n",
            "ssh-rsa is not ed25519; rompatch verifies ed25519 keys only",
        ),
        ("AAAA\n", ":1: not an ed25519 public key"),
        ("ssh-ed25519 AAAA\n", ":1: not an ed25519 public key"),
        (
            "-----BEGIN PRIVATE KEY-----\nMC4\n-----END PRIVATE KEY-----\n",
            "is a private key; pass its public key",
        ),
    ],
)
def test_bad_public_key_files(tmp_path, text, match):
    (tmp_path / "k.pub").write_text(text)
    with pytest.raises(KeyFileError, match=match):
        trusted_keys(tmp_path / "k.pub")


def test_bad_private_key_files(tmp_path, keys):
    with pytest.raises(KeyFileError, match="no such private key file"):
        load_signing_key(tmp_path / "missing.key")
    with pytest.raises(KeyFileError, match="is a public key; signing needs the private key"):
        load_signing_key(keys["alice.pub"])
    (tmp_path / "junk.key").write_text("hello\n")
    with pytest.raises(KeyFileError, match="not a PEM or OpenSSH private key"):
        load_signing_key(tmp_path / "junk.key")
    with pytest.raises(KeyFileError, match="no such public key file"):
        trusted_keys(str(tmp_path / "missing.pub"))
    other = ed448.Ed448PrivateKey.generate()  # another algorithm: refused, as private and as public key
    pem = serialization.Encoding.PEM
    (tmp_path / "ed448.key").write_bytes(
        other.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    with pytest.raises(KeyFileError, match=r"is not an ed25519 key \(Ed448PrivateKey\)"):
        load_signing_key(tmp_path / "ed448.key")
    (tmp_path / "ed448.pub").write_bytes(
        other.public_key().public_bytes(pem, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(KeyFileError, match=r"not an ed25519 key \(Ed448PublicKey\)"):
        trusted_keys(tmp_path / "ed448.pub")


def test_signature_entry_round_trips(keys):
    sig = Signature(keys["alice"].public, bytes(range(64)), "Alice")
    assert Signature.parse(sig.to_json()) == sig


# ---------------------------------------------------------------------- apply and load_patched


@pytest.fixture
def ckpt(tmp_path):
    """A tiny sharded checkpoint, a patch made on it (unsigned, signed by Alice, signed by Mallory)."""
    model, folder = make_ckpt(tmp_path)
    p = vector_patch(model, 1)
    unsigned = save_patch(p, tmp_path / "unsigned.safetensors")
    return {"folder": folder, "id": p.id, "unsigned": unsigned, "shas": file_shas(folder), "root": tmp_path}


def _signed(ckpt, keys, who):
    p = sign_patch(load_patch(ckpt["unsigned"]), keys[who])
    return save_patch(p, ckpt["root"] / f"{who}.safetensors")


def test_cli_apply_require_signature_refuses_before_writing(ckpt, keys):
    runner = CliRunner()
    out = ckpt["root"] / "out"
    base = ["apply", str(ckpt["folder"])]
    cases = [
        ([str(ckpt["unsigned"])], ["--require-signature", str(keys["alice.pub"])], "is not signed"),
        (
            [str(_signed(ckpt, keys, "mallory"))],
            ["--require-signature", str(keys["alice.pub"])],
            "not among the trusted keys",
        ),  # fmt: skip
        (
            [str(_signed(ckpt, keys, "alice")), str(ckpt["unsigned"])],
            ["--require-signature", str(keys["alice.pub"])],
            "is not signed",
        ),  # fmt: skip
        ([str(ckpt["unsigned"])], ["--require-signature", str(keys["alice.key"])], "is a private key"),
        (
            [str(ckpt["unsigned"])],
            ["--require-signature", str(keys["alice.pub"]), "--force"],
            "is not signed",
        ),
    ]
    for patches, opts, msg in cases:
        r = runner.invoke(cli, [*base, *patches, "-o", str(out), *opts])
        assert r.exit_code == 1, r.output
        assert msg in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert not out.exists() and leftovers(ckpt["root"]) == []
    assert file_shas(ckpt["folder"]) == ckpt["shas"]


def test_cli_apply_require_signature_accepts_a_good_signature(ckpt, keys):
    runner = CliRunner()
    out = ckpt["root"] / "out"
    signed = _signed(ckpt, keys, "alice")
    opts = ["--require-signature", str(keys["mallory.pub"]), "--require-signature", str(keys["alice.pub"])]
    r = runner.invoke(cli, ["apply", str(ckpt["folder"]), str(signed), "-o", str(out), *opts])
    assert r.exit_code == 0, r.output
    assert [e["id"] for e in checkpoint_log(out)["applied"]] == [ckpt["id"]]


def test_apply_to_checkpoint_checks_signatures_before_opening_the_checkpoint(ckpt, keys):
    with pytest.raises(UnsignedPatchError):
        apply_to_checkpoint(ckpt["root"] / "no-such-base", ckpt["unsigned"], ckpt["root"] / "out", require_signature=keys["alice.pub"])  # fmt: skip
    signed = _signed(ckpt, keys, "alice")
    r = apply_to_checkpoint(
        ckpt["folder"], signed, ckpt["root"] / "out", require_signature=[keys["alice"].public]
    )
    assert r.applied == [ckpt["id"]]


def test_load_patched_require_signature(tmp_path, keys):
    folder = save_tiny(tmp_path / "tiny", "llama")
    from rompatch.models import load_model

    model, _ = load_model(str(folder), device="cpu")
    p = vector_patch(model, 1)
    unsigned = save_patch(p, tmp_path / "p.safetensors")
    with pytest.raises(UnsignedPatchError):  # before any model is loaded: the base does not exist
        load_patched(str(tmp_path / "no-such-model"), unsigned, require_signature=keys["alice.pub"])
    signed = save_patch(sign_patch(load_patch(unsigned), keys["alice"]), tmp_path / "signed.safetensors")
    m, _ = load_patched(str(folder), signed, device="cpu", require_signature=keys["alice.pub"])
    w = p.parameters[p.deltas[0].parameter]
    assert m.get_parameter(p.deltas[0].parameter).shape == torch.Size(w.shape)


# ------------------------------------------------------------------------------------------ CLI


def test_cli_keygen_sign_verify(tmp_path, patch):
    runner = CliRunner()
    key = tmp_path / "alice.key"
    r = runner.invoke(cli, ["keygen", "-o", str(key), "--signer", "Alice"])
    assert r.exit_code == 0, r.output
    kid = load_signing_key(key).key_id
    assert f"key id {kid}, signer Alice" in r.output and stat.S_IMODE(key.stat().st_mode) == 0o600
    r = runner.invoke(cli, ["keygen", "-o", str(key)])
    assert r.exit_code == 1 and "already exists" in r.stderr
    path = save_patch(patch, tmp_path / "p.safetensors")
    # Signed in place: same id, now verifiable.
    r = runner.invoke(cli, ["sign", str(path), "--key", str(key)])
    assert r.exit_code == 0, r.output
    assert f"signed patch {patch.id} by Alice (key {kid})" in r.output
    assert load_patch(path).id == patch.id
    r = runner.invoke(cli, ["verify", str(path), "--key", f"{key}.pub"])
    assert r.exit_code == 0 and r.output == f"{path}: good signature by Alice (key {kid})\n"
    r = runner.invoke(cli, ["verify", str(path), "--key", f"{key}.pub", "--json"])
    assert json.loads(r.output)["signer"] == "Alice"
    # Another key: refused, one line.
    runner.invoke(cli, ["keygen", "-o", str(tmp_path / "bob.key"), "--signer", "Bob"])
    r = runner.invoke(cli, ["verify", str(path), "--key", str(tmp_path / "bob.key.pub")])
    assert r.exit_code == 1 and "not among the trusted keys" in r.stderr and r.stderr.count("\n") == 1
    # -o writes a copy, re-signed by Bob (--signer overrides); the original keeps Alice's signature.
    out = tmp_path / "bob.safetensors"
    r = runner.invoke(cli, ["sign", str(path), "--key", str(tmp_path / "bob.key"), "-o", str(out), "--signer", "Robert"])  # fmt: skip
    assert r.exit_code == 0 and "replaced the earlier signature" in r.stderr
    assert verify_signature(load_patch(out), tmp_path / "bob.key.pub").signer == "Robert"
    assert verify_signature(load_patch(path), f"{key}.pub").signer == "Alice"
    r = runner.invoke(cli, ["sign", str(path), "--key", str(key), "-o", str(out)])
    assert r.exit_code == 2 and "--overwrite" in r.stderr
    # Several patches: each reported, exit 1 when one fails.
    unsigned = save_patch(vector_patch(make_model("llama"), 2, seed=9), tmp_path / "u.safetensors")
    r = runner.invoke(cli, ["verify", str(path), str(unsigned), "--key", f"{key}.pub"])
    assert r.exit_code == 1 and "good signature by Alice" in r.stdout
    assert "u.safetensors: patch" in r.stderr and "1 of 2 patches did not verify" in r.stderr


def test_cli_sign_needs_a_local_file_or_out():
    r = CliRunner().invoke(cli, ["sign", "alice/edits/x.safetensors", "--key", "k"])
    assert r.exit_code == 2 and "pass -o OUT" in r.stderr


def test_cli_verify_refuses_tampering(tmp_path, patch, keys, model):
    signed = save_patch(sign_patch(patch, keys["alice"]), tmp_path / "p.safetensors")
    moved = vector_patch(model, 2, seed=7)
    moved.extra[SIGNATURE] = load_patch(signed).extra[SIGNATURE]
    save_patch(moved, tmp_path / "moved.safetensors")
    r = CliRunner().invoke(
        cli, ["verify", str(tmp_path / "moved.safetensors"), "--key", str(keys["alice.pub"])]
    )
    assert r.exit_code == 1 and "does not verify for this patch" in r.stderr


def test_errors_are_rompatch_errors():
    for cls in (
        UnsignedPatchError,
        MalformedSignatureError,
        BadSignatureError,
        UntrustedKeyError,
        KeyFileError,
    ):
        assert (
            issubclass(cls, SignatureError) and issubclass(cls, RompatchError) and issubclass(cls, ValueError)
        )


# ------------------------------------------------------------------------------------ model card


def test_model_card_shows_signer_and_key_id(model, keys):
    signed = sign_patch(vector_patch(model, 1), keys["alice"])
    plain = vector_patch(model, 2, seed=4)
    body = render_body([("a.safetensors", signed), ("b.safetensors", plain)], repo_id="alice/edits")
    assert "## Signatures" in body
    assert (
        f"| a.safetensors | Alice <alice@example.com> | `{keys['alice'].key_id}` | verifies for this patch |"
        in body
    )
    assert "| b.safetensors | not signed | | |" in body
    assert "rompatch verify FILE --key SIGNER.pub" in body
    assert "## Signatures" not in render_body([("b.safetensors", plain)], repo_id="alice/edits")
    moved = vector_patch(model, 2, seed=6)
    moved.extra[SIGNATURE] = signed.extra[SIGNATURE]
    assert "| INVALID |" in render_body([("m.safetensors", moved)], repo_id="alice/edits")
