"""The ``rompatch`` command group. Library errors become one-line messages here, in one place."""

from __future__ import annotations

import errno
import importlib
import logging
import sys
import traceback

import click
from click.utils import make_default_short_help
from safetensors import SafetensorError

from .._version import __version__
from ..errors import RompatchError

# Each command: the module of rompatch/cli that defines it (in its COMMANDS) and its one-line help.
# `rompatch --help` lists them from this table without importing the modules (which import torch);
# a command's module is imported when that command runs (click's "lazily loading subcommands").
# tests/cli/test_main.py checks the table against the commands themselves.
COMMANDS: dict[str, tuple[str, str]] = {
    "audit": (
        "audit",
        "What PATCH changes beyond its own fact: where it fires, what else it changes, and a verdict.",
    ),
    "apply": ("checkpoint", "Apply patches to checkpoint BASE and write the complete model folder OUT."),
    "revert": (
        "checkpoint",
        "Remove patches from CHECKPOINT, writing OUT (-o) or replacing it (--in-place).",
    ),
    "log": ("checkpoint", "The patches applied to CHECKPOINT, in order, with their edits and fingerprints."),
    "stack": ("checkpoint", "Combine patches into one patch file holding all their deltas, in order."),
    "diff": ("checkpoint", "Compare two patches, two checkpoints, or a checkpoint and a patch."),
    "extract": ("checkpoint", "Recover the edit between checkpoints BASE and EDITED as a patch."),
    "create": ("create", "Compute a ROME edit of MODEL and write it as a patch."),
    "stats": ("create", "Precompute and cache second-moment statistics E[kkᵀ] for MODEL's edit layer(s)."),
    "eval": (
        "eval",
        "Evaluate ROME edits on CounterFact or zsRE, before and after each edit, or sequentially.",
    ),
    "push": ("hub", "Upload PATCH files and a generated model card to the Hub repo REPO_ID, in one commit."),
    "pull": ("hub", "Download the patch REF (REPO_ID[/file.safetensors][@REV]) and print its local path."),
    "export-peft": (
        "hub",
        "Write PATCH (several: a stack, in order) as an exactly equal PEFT LoRA adapter in -o DIR.",
    ),
    "keygen": ("sign", "Make an ed25519 signing key: private KEYFILE (mode 0600) and public KEYFILE.pub."),
    "predict": ("predict", "Top next tokens and the greedy continuation of each --prompt."),
    "show": (
        "show",
        "Describe PATCH: base model, edits (subject, prompt, old → new), layer, sizes, id, lineage.",
    ),
    "sign": ("sign", "Sign PATCH with the private key KEYFILE: who made it, on top of what it is."),
    "trace": ("trace", "Causal tracing: which layers and tokens carry a fact (ROME paper, §2.1)."),
    "verify": (
        "sign",
        "Check that each PATCH is signed, unaltered, by one of the trusted public keys; print the signer.",
    ),
}


class _Group(click.Group):
    """Commands loaded on use, listed from ``COMMANDS``; library errors become one-line messages."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module = importlib.import_module(f"{__package__}.{COMMANDS[cmd_name][0]}")
        return next(c for c in module.COMMANDS if c.name == cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        limit = formatter.width - 6 - max(len(n) for n in COMMANDS)
        rows = [(name, make_default_short_help(COMMANDS[name][1], limit)) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (RompatchError, OSError, SafetensorError) as e:
            if ctx.obj and ctx.obj.get("verbose"):
                traceback.print_exc()
            raise click.ClickException(_one_line(e)) from None


_FULL = (errno.ENOSPC, errno.EDQUOT)


def _one_line(e: BaseException) -> str:
    """A library error as it is; an error of the system (disk full, permission denied) as one line
    naming it, the file and the fix. Every write rompatch makes is atomic, so nothing is half-written."""
    if isinstance(e, RompatchError):
        return str(e)
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    full = (isinstance(e, OSError) and e.errno in _FULL) or "No space left on device" in text
    where = f" writing {e.filename}" if isinstance(e, OSError) and e.filename else ""
    if full:
        return (
            f"No space left on device{where}: free some space (or write to another disk) and run again; "
            "nothing was changed"
        )
    if isinstance(e, OSError):
        return f"{e.strerror or text}{':' if e.filename else ''} {e.filename or ''}".strip() + (
            "; nothing was changed"
        )
    return f"{text}; nothing was changed"


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug); shows tracebacks.")
@click.version_option(__version__, prog_name="rompatch")
@click.pass_context
def cli(ctx: click.Context, verbose: int) -> None:
    """rompatch: fact edits (ROME) as small, reviewable, revertible patch files.

    Data goes to stdout, messages to stderr. MODEL is an embedded alias (smollm2-135m,
    gemma3-270m), a local model folder or a Hugging Face Hub id.
    """
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("rompatch").setLevel(level)
    if verbose == 0:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def main() -> None:
    cli(prog_name="rompatch")
