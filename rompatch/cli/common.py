"""Options and helpers shared by the CLI commands."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
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


def placement_options(f: Callable) -> Callable:
    """--device-map, --max-memory and --offload-folder, passed to the command as one keyword,
    ``placement`` (``load_model``'s keywords: ``load_model(m, device=..., **placement)``)."""

    @click.option(
        "--device-map",
        default=None,
        metavar="STRATEGY|FILE|JSON",
        help="Spread the model over GPUs, CPU memory and disk with accelerate instead of --device: "
        "auto, balanced, sequential, or a JSON map of module -> device (0, cuda:1, cpu, disk).",
    )
    @click.option(
        "--max-memory",
        default=None,
        metavar="DEV=SIZE,...",
        help="With --device-map: memory per device, like 0=20GiB,1=20GiB,cpu=64GiB.",
    )
    @click.option(
        "--offload-folder",
        type=click.Path(file_okay=False),
        default=None,
        help="With --device-map: where offloaded weights may be written (default: a temporary folder).",
    )
    @functools.wraps(f)
    def wrapper(*args: Any, device_map: Any, max_memory: Any, offload_folder: Any, **kw: Any) -> Any:
        placement = {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder}
        return f(*args, placement=placement, **kw)

    return wrapper


model_argument = click.argument("model", default=DEFAULT_MODEL, metavar="MODEL")
revision_option = click.option(
    "--revision", default=None, help="Hub revision (branch, tag or commit) for Hub references."
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON to stdout.")


def note_placement(line: str | None) -> None:
    """Tell the user where a model loaded with --device-map sits (``rompatch.placement.describe``;
    None for a model on one device: nothing to say)."""
    if line is not None:
        info(line)


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, ensure_ascii=False))


def info(msg: str) -> None:
    """A message for the user (stderr), never mixed with data on stdout."""
    click.echo(msg, err=True)


def is_tty() -> bool:
    return sys.stderr.isatty()
