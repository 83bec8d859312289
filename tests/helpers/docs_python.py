"""Runs the Python examples of one documentation page, for ``tests/test_docs.py``.

Started once per page (``python tests/helpers/docs_python.py``) in the page's working folder. It reads one
JSON request per line on stdin, ``{"code", "filename", "line"}``, executes the code in a namespace
shared by every block of the page (like a notebook, or one script pasted block by block), and answers
with one JSON line, ``{"ok", "output", "error"}``: what the block printed, and the traceback if it
raised. Line numbers in tracebacks are those of the Markdown file.

The answers travel on a private copy of the original stdout; file descriptor 1 is pointed at stderr,
so output that bypasses ``sys.stdout`` (a subprocess, C code) cannot garble them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import traceback


class _Tee(io.TextIOBase):
    """Collects what a block prints and echoes it to stderr (the runner's log)."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, s: str) -> int:
        self.parts.append(s)
        sys.stderr.write(s)
        return len(s)

    def getvalue(self) -> str:
        return "".join(self.parts)


def main() -> None:
    answers = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", closefd=False), encoding="utf-8", line_buffering=True)
    namespace: dict = {"__name__": "__main__"}
    for line in sys.stdin:
        req = json.loads(line)
        out = _Tee()
        error = None
        try:
            # Padding keeps the Markdown file's line numbers in tracebacks.
            code = compile("\n" * (req["line"] - 1) + req["code"], req["filename"], "exec")
            with contextlib.redirect_stdout(out):
                exec(code, namespace)
        except BaseException:  # reported to the runner, which fails the test
            error = traceback.format_exc()
        sys.stdout.flush()
        answers.write(json.dumps({"ok": error is None, "output": out.getvalue(), "error": error}) + "\n")
        answers.flush()


if __name__ == "__main__":
    main()
