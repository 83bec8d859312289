"""``rompatch keygen | sign | verify``: who made a patch (ed25519 signatures, rompatch.signing)."""

from __future__ import annotations

from pathlib import Path

import click

from ..constants import SIGNATURE
from ..errors import RompatchError
from ..patch import save_patch
from ..refs import resolve_patch
from ..signing import (
    ENV_PASSPHRASE,
    generate_key,
    load_signing_key,
    read_signature,
    sign_patch,
    trusted_keys,
    verify_signature,
    write_keys,
)
from .common import echo_json, info, json_option, revision_option

signer_option = click.option(
    "--signer",
    default=None,
    metavar="NAME",
    help="The signer's name or e-mail address, signed with each patch.",
)


@click.command("keygen")
@click.option(
    "-o",
    "--out",
    "out",
    required=True,
    type=click.Path(dir_okay=False),
    metavar="KEYFILE",
    help="The private key file to write; the public key goes to KEYFILE.pub.",
)
@signer_option
@click.option("--force", is_flag=True, help="Replace existing key files (the old private key is lost).")
@json_option
def keygen_cmd(out, signer, force, as_json) -> None:
    """Make an ed25519 signing key: private KEYFILE (mode 0600) and public KEYFILE.pub.

    Keep KEYFILE to yourself; give KEYFILE.pub to those who check your patches
    (`rompatch verify PATCH --key KEYFILE.pub`). The name given with --signer is kept in
    KEYFILE.pub and signed with every patch you sign.
    """
    key = generate_key(signer)
    private, public = write_keys(key, out, overwrite=force)
    if as_json:
        echo_json(
            {
                "private_key": str(private),
                "public_key": str(public),
                "key_id": key.key_id,
                "signer": key.signer,
            }
        )
        return
    click.echo(f"wrote {private} (private key: keep it secret) and {public} (public key: share it)")
    click.echo(f"key id {key.key_id}" + (f", signer {key.signer}" if key.signer else ""))


@click.command("sign")
@click.argument("patch")
@click.option(
    "--key",
    "keyfile",
    required=True,
    type=click.Path(dir_okay=False),
    metavar="KEYFILE",
    help=f"Private key file (rompatch keygen, or ssh-keygen -t ed25519; an encrypted one reads ${ENV_PASSPHRASE}).",
)
@click.option(
    "-o",
    "--out",
    "out",
    default=None,
    type=click.Path(dir_okay=False),
    help="Write the signed patch here (default: replace PATCH, atomically).",
)
@signer_option
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT.")
@revision_option
@json_option
def sign_cmd(patch, keyfile, out, signer, overwrite, revision, as_json) -> None:
    """Sign PATCH with the private key KEYFILE: who made it, on top of what it is.

    The signature covers the patch id (every hashed field: the deltas, their requests, base and
    fingerprints, lineage) and the signer's name; it is stored in the file's metadata, outside the
    content hash, so the id does not change. A file holds one signature: signing again replaces it.
    """
    local = Path(patch).expanduser().is_file()
    if out is None and not local:
        raise click.UsageError(f"{patch} is not a local file; pass -o OUT to write the signed copy")
    if out is not None and Path(out).exists() and not overwrite and not _same_file(out, patch):
        raise click.UsageError(f"{out} already exists; pass --overwrite to replace it")
    key = load_signing_key(keyfile, signer=signer)
    p = resolve_patch(patch, revision=revision)
    try:
        before = read_signature(p)
    except RompatchError:  # a malformed entry is replaced like any other
        before = None
    replaced = p.extra.get(SIGNATURE) is not None
    sign_patch(p, key)
    dest = save_patch(p, out if out is not None else Path(patch).expanduser())
    after = read_signature(p)
    assert after is not None
    if as_json:
        echo_json(
            {
                "path": str(dest),
                "patch_id": p.id,
                "key_id": after.key_id,
                "signer": after.signer,
                "replaced": replaced,
            }
        )
        return
    if replaced and before is None:
        info("replaced a malformed signature entry")
    elif before is not None:
        info(f"replaced the earlier signature by {_who(before.signer, before.key_id)}")
    click.echo(f"signed patch {p.id} by {_who(after.signer, after.key_id)}")
    click.echo(f"wrote {dest}")


def _who(signer: str | None, key_id: str) -> str:
    return f"{signer} (key {key_id})" if signer else f"key {key_id}"


def _same_file(a: str, b: str) -> bool:
    try:
        return Path(a).expanduser().samefile(Path(b).expanduser())
    except OSError:
        return False


@click.command("verify")
@click.argument("patches", nargs=-1, required=True)
@click.option(
    "--key",
    "keys",
    multiple=True,
    required=True,
    type=click.Path(dir_okay=False),
    metavar="PUBKEY",
    help="A trusted public key file (KEYFILE.pub; repeatable; a file may hold several keys, one a line).",
)
@revision_option
@json_option
def verify_cmd(patches, keys, revision, as_json) -> None:
    """Check that each PATCH is signed, unaltered, by one of the trusted public keys; print the signer.

    Exits 1 when a patch is unsigned, its signature is malformed or does not verify (it was made for
    another patch, altered or forged), or its key is not one of the --key keys.
    """
    trusted = trusted_keys(list(keys))
    if len(patches) == 1:  # one patch: the error is the message
        v = verify_signature(resolve_patch(patches[0], revision=revision), trusted)
        echo_json({"patch": patches[0], **v.to_dict()}) if as_json else click.echo(
            f"{patches[0]}: {v.describe()}"
        )
        return
    results, failed = [], 0
    for ref in patches:
        try:
            v = verify_signature(resolve_patch(ref, revision=revision), trusted)
        except RompatchError as e:
            failed += 1
            results.append({"patch": ref, "error": str(e)})
            if not as_json:
                info(f"{ref}: {e}")
            continue
        results.append({"patch": ref, **v.to_dict()})
        if not as_json:
            click.echo(f"{ref}: {v.describe()}")
    if as_json:
        echo_json(results)
    if failed:
        raise click.ClickException(f"{failed} of {len(patches)} patches did not verify")


COMMANDS = [keygen_cmd, sign_cmd, verify_cmd]
