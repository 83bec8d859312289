"""Options and helpers shared by the CLI commands."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from ..constants import DEFAULT_MODEL

device_option = click.option(
    "--device", default="auto", show_default=True, help="auto (CUDA if available), cpu, cuda or cuda:N."
)
dtype_option = click.option(
    "--dtype",
    default="float32",
    show_default=True,
    type=click.Choice(["float32", "float16", "bfloat16", "fp32", "fp16", "bf16"]),
    help="Weights dtype to load the model in.",
)
model_argument = click.argument("model", default=DEFAULT_MODEL, metavar="MODEL")
revision_option = click.option(
    "--revision", default=None, help="Hub revision (branch, tag or commit) for Hub references."
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON to stdout.")


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, ensure_ascii=False))


def info(msg: str) -> None:
    """A message for the user (stderr), never mixed with data on stdout."""
    click.echo(msg, err=True)


def is_tty() -> bool:
    return sys.stderr.isatty()
