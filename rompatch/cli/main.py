"""The ``rompatch`` command group. Library errors become one-line messages here, in one place."""

from __future__ import annotations

import logging
import sys

import click

from .._version import __version__
from ..errors import RompatchError


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except RompatchError as e:
            if ctx.obj and ctx.obj.get("verbose"):
                import traceback

                traceback.print_exc()
            raise click.ClickException(str(e)) from None


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


def _register() -> None:
    """Add every command module's ``COMMANDS`` (one module per group, in rompatch/cli/)."""
    import importlib
    import pkgutil

    from .. import cli as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name in ("main", "common"):
            continue
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for cmd in getattr(mod, "COMMANDS", ()):
            cli.add_command(cmd)


_register()


def main() -> None:
    cli(prog_name="rompatch")
