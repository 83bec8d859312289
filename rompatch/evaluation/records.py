"""Files of the evaluation: JSON inputs, and the output folder of a resumable run.

A run's folder holds ``config.json`` (the configuration its results belong to), per-case (or
per-edit) records in JSONL files appended as they finish, and at the end ``results.json`` and
``summary.md``, written atomically. A rerun reads the JSONL records back and skips what is done.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..atomic import atomic_write
from ..errors import EvalError, RompatchError

log = logging.getLogger(__name__)

CASES_FILE = "cases.jsonl"
# A torchrun process's cases (rank r) until rank 0 adds them to CASES_FILE (rompatch.distributed).
PART_FILE = "cases.part-{rank}.jsonl"
CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
SUMMARY_FILE = "summary.md"


# ------------------------------------------------------------------------------------ inputs


def read_json(
    path: str | Path,
    *,
    error: type[RompatchError] = EvalError,
    unreadable: str = "cannot read {path}: {reason}",
    invalid: str = "{path} is not valid JSON ({msg} at line {line})",
) -> Any:
    """A JSON file's content. An unreadable or invalid file raises ``error`` with the message
    ``unreadable`` (fields: path, reason) or ``invalid`` (fields: path, msg, line)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise error(unreadable.format(path=path, reason=e.strerror)) from None
    except json.JSONDecodeError as e:
        raise error(invalid.format(path=path, msg=e.msg, line=e.lineno)) from None


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- a run's folder


def read_cases(path: Path) -> list[dict[str, Any]]:
    """Per-case records from a JSONL file; a truncated last line (interrupted write) is dropped."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    out: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                log.warning("%s: dropping an incomplete last line (interrupted run)", path)
                with open(path, "r+", encoding="utf-8") as f:
                    f.truncate(len("".join(lines[:i]).encode("utf-8")))
                break
            raise EvalError(
                f"{path}: line {i + 1} is not valid JSON; delete the file to start over"
            ) from None
    else:
        if lines and not lines[-1].endswith("\n"):  # complete record, newline not yet written
            with open(path, "a", encoding="utf-8") as f:
                f.write("\n")
    return out


def append_record(path: Path, obj: Mapping[str, Any]) -> None:
    """Append one record as a JSONL line and flush it."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        f.flush()


def check_config(out_dir: Path, config: Mapping[str, Any]) -> None:
    """Write ``config.json`` on first use; refuse to mix results of another configuration."""
    path = out_dir / CONFIG_FILE
    want = json.loads(json.dumps(config, sort_keys=True))
    if path.is_file():
        try:
            have = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            have = None
        if have != want:
            diff = (
                sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
                if isinstance(have, dict)
                else ["config.json unreadable"]
            )
            raise EvalError(
                f"{out_dir} holds results of a different evaluation (differs in: {', '.join(diff)}); "
                "use another --out folder or delete this one"
            )
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(want, indent=2, sort_keys=True)))


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1, ensure_ascii=False)))


def write_results(out_dir: Path, result: Mapping[str, Any]) -> None:
    """``results.json`` (the result without its markdown) and ``summary.md`` (the markdown)."""
    write_json(out_dir / RESULTS_FILE, {k: v for k, v in result.items() if k != "markdown"})
    md = result["markdown"] + "\n"
    atomic_write(out_dir / SUMMARY_FILE, lambda tmp: Path(tmp).write_text(md, encoding="utf-8"))


__all__ = [
    "CASES_FILE",
    "PART_FILE",
    "CONFIG_FILE",
    "RESULTS_FILE",
    "SUMMARY_FILE",
    "read_json",
    "file_sha256",
    "read_cases",
    "append_record",
    "check_config",
    "write_json",
    "write_results",
]
