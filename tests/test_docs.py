"""Every runnable example in README.md and docs/*.md runs here, as written.

Each page is one test, with the page's path as its id. Its runnable blocks run in order, in one fresh
temporary folder holding a copy of the repository's ``patches/`` (so ``patches/eiffel-tower-rome.safetensors``
means there what it means in a checkout), with:

* ``rompatch``, ``python`` and ``torchrun`` on PATH running this checkout, as after ``pip install -e .``;
* the Hugging Face Hub replaced by the test server (``hub_env``, ``tests/helpers/hubserver/``): ``HF_ENDPOINT``
  points at it and ``HF_TOKEN`` belongs to user ``alice``, so examples push to and pull from ``alice/...``
  repos, and nothing reaches the network;
* ``MPLBACKEND=Agg``; the rest of the environment (``ROMPATCH_CACHE``, ``ROMPATCH_DATA``,
  ``OMP_NUM_THREADS``, ...) as given.

Marking blocks, in the fence's info string (the first word stays the language, for highlighting):

``python run``
    Executed by one Python process per page (``tests/helpers/docs_python.py``). The Python blocks of a page
    share one namespace, as in a notebook.
``console run``
    A shell session. Each line starting with ``$ `` is a command (a line ending in ``\\`` continues on
    the next one), run with bash; commands keep the variables (``BASE=$(...)``) and the folder
    (``cd``) of the earlier ones of the page. Other lines show output and are not compared. Every
    command must exit 0, except one whose last line ends with ``# exits N`` (a bash comment, so the
    line still copies and pastes): it must exit N.
``LANG file=PATH``
    Not run: the block's text is written to PATH in the page's folder (``json file=requests.json``),
    for later blocks to use. The reader sees an ordinary block.
``expect="TEXT"`` (with ``run``, repeatable)
    TEXT must appear in what the block printed (for console blocks: stdout and stderr of its
    commands). Choose words that stay true, not numbers that vary with the statistics source or the
    machine; shown output is otherwise illustrative.

Plain blocks (```` ```python ````, ```` ```console ````, ```` ```text ````) are not run: keep them rare, for
what cannot run here (``pip install`` from the network, ``make test`` itself).

Marking pages, with an HTML comment anywhere in the page:

``<!-- docs-test: slow -->``
    The examples use a real model (the default SmolLM2-135M): the test is marked ``slow``.
    ``test_real_model_pages_are_marked_slow`` fails for a page that uses one without the mark.
``<!-- docs-test: slow data -->``
    They also need the evaluation data (CounterFact, known facts): without it the test skips, naming
    ``ROMPATCH_DATA`` (in CI it fails instead, see ``tests/conftest.py``); with it, ``$ROMPATCH_DATA``
    is set for the examples.

The same convention is summed up for doc writers in docs/README.md.
"""

from __future__ import annotations

import json
import os
import re
import select
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
DRIVER = Path(__file__).parent / "helpers" / "docs_python.py"
TIMEOUT_S = 3600  # per command or Python block: a causal trace of a real model takes minutes on 2 cores
PAGE_MARKS = {"slow", "data"}
# What gives away a real model in a runnable block (a page using one must be marked slow).
REAL_MODEL_HINTS = ("smollm2-135m", "gemma3-270m", "ensure_embedded", "load_model(", "load_patched(")

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_EXITS = re.compile(r"#\s*exits\s+(\d+)\b")
_DIRECTIVE = re.compile(r"<!--\s*docs-test:(.*?)-->", re.S)


# ------------------------------------------------------------------------------------- parsing


@dataclass
class Block:
    """A fenced code block. ``line``: the page line of its first content line (1-based)."""

    lang: str
    text: str
    line: int
    run: bool = False
    file: str | None = None
    expect: list[str] = field(default_factory=list)


@dataclass
class Command:
    """One ``$ `` command of a console block, continuation lines included."""

    text: str
    line: int
    exit_code: int = 0


def parse_blocks(text: str, where: str = "page") -> list[Block]:
    """All fenced code blocks of a Markdown page, in order."""
    lines = text.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent = m["fence"], len(m["indent"])
        close = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        j = i + 1
        while j < len(lines) and not close.match(lines[j]):
            j += 1
        body = [ln[indent:] if ln[:indent].isspace() else ln for ln in lines[i + 1 : j]]
        blocks.append(_block(m["info"].strip(), "".join(ln + "\n" for ln in body), i + 2, f"{where}:{i + 1}"))
        i = j + 1
    return blocks


def _block(info: str, text: str, line: int, where: str) -> Block:
    words = shlex.split(info) if info else []
    b = Block(lang=words[0] if words else "", text=text, line=line)
    flags = words[1:]
    if "run" not in flags and not any(f.startswith("file=") for f in flags):
        return b  # an ordinary block: its other words are none of our business
    for f in flags:
        if f == "run":
            b.run = True
        elif f.startswith("file="):
            b.file = f[5:]
        elif f.startswith("expect="):
            b.expect.append(f[7:])
        else:
            raise ValueError(f"{where}: unknown word {f!r} in a runnable block's info string {info!r}")
    if b.run and b.file:
        raise ValueError(f"{where}: a block either runs (run) or is written to a file (file=...), not both")
    if b.run and b.lang not in ("python", "console"):
        raise ValueError(f"{where}: only python and console blocks run, not {b.lang!r}")
    if b.expect and not b.run:
        raise ValueError(f"{where}: expect= needs a block that runs")
    if b.file is not None and (not b.file or Path(b.file).is_absolute() or ".." in Path(b.file).parts):
        raise ValueError(f"{where}: file= needs a relative path inside the page's folder, not {b.file!r}")
    return b


def parse_commands(block: Block, where: str = "page") -> list[Command]:
    """The ``$ `` commands of a console block (output lines are skipped)."""
    cmds: list[Command] = []
    current: list[str] | None = None
    for k, ln in enumerate(block.text.splitlines()):
        if current is None:
            if not ln.startswith("$ "):
                continue  # shown output
            current = [ln[2:]]
            cmds.append(Command("", block.line + k))
        else:
            current.append(ln)
        if not ln.endswith("\\"):
            cmds[-1].text = "\n".join(current)
            m = _EXITS.search(current[-1])
            cmds[-1].exit_code = int(m.group(1)) if m else 0
            current = None
    if current is not None:
        raise ValueError(f"{where}:{cmds[-1].line}: the command's last line ends with a backslash")
    if not cmds:
        raise ValueError(f"{where}:{block.line - 1}: a console run block needs at least one '$ ' command")
    return cmds


def _strip_fences(text: str) -> str:
    return re.sub(r"^ {0,3}(`{3,}|~{3,}).*?^ {0,3}\1\s*$", "", text, flags=re.S | re.M)


def _without_code(text: str) -> str:
    return re.sub(r"(`+)[^\n]*?\1", "", _strip_fences(text))


def page_marks(text: str, where: str = "page") -> set[str]:
    """The words of the page's ``<!-- docs-test: ... -->`` comments (outside code)."""
    found = _DIRECTIVE.finditer(_without_code(text))
    marks = {w for m in found for w in re.split(r"[\s,]+", m.group(1).strip()) if w}
    unknown = marks - PAGE_MARKS
    if unknown:
        raise ValueError(f"{where}: unknown docs-test mark(s) {sorted(unknown)}; known: {sorted(PAGE_MARKS)}")
    return marks


# -------------------------------------------------------------------------------------- running


_SHIM_ROMPATCH = """#!/bin/sh
exec "{python}" -c 'import sys; from rompatch.cli.main import cli; cli(sys.argv[1:], prog_name="rompatch")' "$@"
"""
_SHIM_PYTHON = """#!/bin/sh
exec "{python}" "$@"
"""
_SHIM_TORCHRUN = """#!/bin/sh
exec "{python}" -m torch.distributed.run "$@"
"""
# Around each command: restore the variables and folder the previous commands left, run the command
# with every assignment exported (set -a), then save them again.
_SHELL = """set -a
. "$__DOCS_STATE"
{command}
__docs_rc=$?
{{ export -p; printf 'cd %q\\n' "$PWD"; }} > "$__DOCS_STATE"
exit $__docs_rc
"""


def _tail(text: str, n: int = 4000) -> str:
    return text if len(text) <= n else "…" + text[-n:]


class PageRunner:
    """Runs one page's blocks in ``root/work``; commands see ``rompatch``/``python`` shims on PATH."""

    def __init__(self, name: str, root: Path):
        self.name = name
        self.work = root / "work"
        shutil.copytree(REPO / "patches", self.work / "patches")
        bin_dir = root / "bin"
        bin_dir.mkdir()
        shims = (("rompatch", _SHIM_ROMPATCH), ("python", _SHIM_PYTHON), ("python3", _SHIM_PYTHON),
                 ("torchrun", _SHIM_TORCHRUN))  # fmt: skip
        for shim, text in shims:
            (bin_dir / shim).write_text(text.format(python=sys.executable))
            (bin_dir / shim).chmod(0o755)
        self.state = root / "shell-state.sh"
        self.state.write_text(f"cd {shlex.quote(str(self.work))}\n")
        self.python_log = root / "python.log"
        self.env = dict(os.environ)
        self.env["PATH"] = f"{bin_dir}{os.pathsep}{self.env.get('PATH', '')}"
        pp = self.env.get("PYTHONPATH")
        self.env["PYTHONPATH"] = f"{REPO}{os.pathsep}{pp}" if pp else str(REPO)
        self.env["MPLBACKEND"] = "Agg"
        self.env["__DOCS_STATE"] = str(self.state)
        self.driver: subprocess.Popen | None = None

    def run(self, blocks: list[Block]) -> None:
        try:
            for b in blocks:
                if b.file is not None:
                    dest = self.work / b.file
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_text(b.text)
                elif b.lang == "console":
                    self._check_expect(b, self._console(b))
                elif b.lang == "python":
                    self._check_expect(b, self._python(b))
        finally:
            self.close()

    def _check_expect(self, b: Block, output: str) -> None:
        for text in b.expect:
            if text not in output:
                raise AssertionError(
                    f"{self.name}:{b.line - 1}: expected {text!r} in the output of this block; it printed:\n"
                    + _tail(output)
                )

    def _console(self, b: Block) -> str:
        outputs = []
        for cmd in parse_commands(b, self.name):
            print(f"$ {cmd.text}", flush=True)
            proc = subprocess.run(
                ["bash", "-c", _SHELL.format(command=cmd.text)],
                cwd=self.work,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=TIMEOUT_S,
            )
            print(proc.stdout, flush=True)
            if proc.returncode != cmd.exit_code:
                want = "0" if cmd.exit_code == 0 else f"{cmd.exit_code} (as its '# exits' comment says)"
                raise AssertionError(
                    f"{self.name}:{cmd.line}: `{cmd.text.splitlines()[0]}` exited {proc.returncode}, expected "
                    f"{want}; output:\n{_tail(proc.stdout)}"
                )
            outputs.append(proc.stdout)
        return "".join(outputs)

    def _python(self, b: Block) -> str:
        if self.driver is None:
            self.driver = subprocess.Popen(
                [sys.executable, str(DRIVER)],
                cwd=self.work,
                env=self.env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self.python_log.open("w"),
                text=True,
            )
        d = self.driver
        d.stdin.write(json.dumps({"code": b.text, "filename": self.name, "line": b.line}) + "\n")
        d.stdin.flush()
        ready, _, _ = select.select([d.stdout], [], [], TIMEOUT_S)
        reply = d.stdout.readline() if ready else ""
        if not reply:
            raise AssertionError(
                f"{self.name}:{b.line - 1}: the Python block "
                + ("timed out" if not ready else f"killed its interpreter (exit {d.wait()})")
                + f"; its log:\n{_tail(self.python_log.read_text())}"
            )
        res = json.loads(reply)
        print(res["output"], flush=True)
        if not res["ok"]:
            raise AssertionError(f"{self.name}:{b.line - 1}: the Python block raised:\n{res['error']}")
        return res["output"]

    def close(self) -> None:
        if self.driver is not None:
            self.driver.stdin.close()
            try:
                self.driver.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.driver.kill()
                self.driver.wait()
            self.driver = None


def run_page(name: str, text: str, root: Path) -> None:
    """Run the runnable blocks of the page ``text`` (called ``name`` in messages) in ``root/work``."""
    blocks = [b for b in parse_blocks(text, name) if b.run or b.file is not None]
    PageRunner(name, root).run(blocks)


# ---------------------------------------------------------------------------------------- pages


def _rel(page: Path) -> str:
    return page.relative_to(REPO).as_posix()


def _params():
    for page in PAGES:
        marks = page_marks(page.read_text(), _rel(page))
        pm = [pytest.mark.slow] if "slow" in marks else []
        pm += [pytest.mark.data] if "data" in marks else []
        yield pytest.param(page, marks=pm, id=_rel(page))


@pytest.mark.parametrize("page", list(_params()))
def test_page_examples(page: Path, request, hub_env, tmp_path, monkeypatch):
    text = page.read_text()
    if not any(b.run for b in parse_blocks(text, _rel(page))):
        pytest.skip("no runnable examples")
    if "data" in page_marks(text):
        monkeypatch.setenv("ROMPATCH_DATA", str(request.getfixturevalue("shared_data")))
    run_page(_rel(page), text, tmp_path)


def test_real_model_pages_are_marked_slow():
    unmarked = []
    for page in PAGES:
        text = page.read_text()
        if "slow" in page_marks(text):
            continue
        code = "".join(b.text for b in parse_blocks(text) if b.run)
        unmarked += [f"{_rel(page)} ({hint})" for hint in REAL_MODEL_HINTS if hint in code]
    assert not unmarked, f"pages whose examples use a real model need <!-- docs-test: slow -->: {unmarked}"


# ----------------------------------------------------------------------------------------- links

_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)")


def github_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a Markdown page's headings."""
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", _strip_fences(text), re.M):
        slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_links_resolve():
    broken = []
    for page in PAGES:
        for target in _LINK.findall(_without_code(page.read_text())):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: not checked offline
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{_rel(page)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in github_anchors(dest.read_text()):
                broken.append(f"{_rel(page)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_is_an_entry_point():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250, "README.md is the entry point; the reference belongs in docs/"
    assert "pip install" in text
    missing = [_rel(p) for p in PAGES[1:] if _rel(p) not in text]
    assert not missing, f"README.md should link every docs page: {missing}"


# ------------------------------------------------------------------------- the runner itself

SAMPLE = """\
A page exercising the runner.

```text file=notes/greeting.txt
hello
```

```console run expect="hello world" expect="42"
$ NAME=$(cat notes/greeting.txt)
$ echo "$NAME" \\
    world
hello world
$ mkdir -p sub && cd sub
$ python -c "print(6 * 7)"
42
$ test -f ../notes/greeting.txt && test "$(basename "$PWD")" = sub
$ false   # exits 1
```

```python
raise SystemExit("plain blocks do not run")
```

```python run
answer = 6 * 7
```

```python run expect="42 hello"
print(answer, open("notes/greeting.txt").read().strip())
```
"""


def test_parse_blocks_and_commands():
    blocks = parse_blocks(SAMPLE)
    assert [(b.lang, b.run, b.file) for b in blocks] == [
        ("text", False, "notes/greeting.txt"),
        ("console", True, None),
        ("python", False, None),
        ("python", True, None),
        ("python", True, None),
    ]
    assert blocks[1].expect == ["hello world", "42"] and blocks[0].text == "hello\n"
    cmds = parse_commands(blocks[1])
    assert [c.text for c in cmds] == [
        "NAME=$(cat notes/greeting.txt)",
        'echo "$NAME" \\\n    world',
        "mkdir -p sub && cd sub",
        'python -c "print(6 * 7)"',
        'test -f ../notes/greeting.txt && test "$(basename "$PWD")" = sub',
        "false   # exits 1",
    ]
    assert [c.exit_code for c in cmds] == [0, 0, 0, 0, 0, 1]
    assert cmds[1].line == SAMPLE.splitlines().index('$ echo "$NAME" \\') + 1
    for info, match in [
        ("python run expcet=x", "unknown word"),
        ("json run", "only python and console"),
        ("python run file=a.py", "not both"),
        ("json file=../x", "relative path"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_blocks(f"```{info}\nx\n```\n")
    assert page_marks("<!-- docs-test: slow data -->") == {"slow", "data"}
    with pytest.raises(ValueError, match="unknown docs-test mark"):
        page_marks("<!-- docs-test: fast -->")


def test_runner_runs_a_page(tmp_path):
    run_page("sample.md", SAMPLE, tmp_path)
    assert (tmp_path / "work" / "patches" / "eiffel-tower-rome.safetensors").is_file()


@pytest.mark.parametrize(
    "page, match",
    [
        ("```console run\n$ echo hi\n$ exit 3\n```\n", r"bad\.md:3: `exit 3` exited 3, expected 0"),
        ("```console run\n$ true   # exits 2\n```\n", r"exited 0, expected 2 \(as its '# exits' comment"),
        ('```console run expect="bye"\n$ echo hi\n```\n', r"bad\.md:1: expected 'bye'"),
        ("\n```python run\nx = 1\ny = x / 0\n```\n", r'(?s)File "bad\.md", line 4.*ZeroDivisionError'),
        ('```python run expect="two"\nprint("one")\n```\n', r"expected 'two' in the output"),
    ],
    ids=["command-fails", "exits-comment", "console-expect", "python-raises", "python-expect"],
)
def test_runner_reports_failures_with_page_lines(tmp_path, page, match):
    with pytest.raises(AssertionError, match=match):
        run_page("bad.md", page, tmp_path)
