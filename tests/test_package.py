"""The package itself: lazy public names, and what importing it (or asking the CLI for help) costs;
and the test suite's own layout (no test module imports another)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import rompatch

REPO = Path(__file__).resolve().parent.parent


def _python(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (nothing imported yet) that imports this checkout's rompatch."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out


def test_import_rompatch_does_not_import_torch():
    _python(
        "import rompatch, sys\nassert 'torch' not in sys.modules, 'torch imported'\nprint(rompatch.__version__)"
    )


def test_cli_help_does_not_import_torch():
    out = _python(
        "import runpy, sys\n"
        "sys.argv = ['rompatch', '--help']\n"
        "try:\n"
        "    runpy.run_module('rompatch', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    for cmd in ("create", "apply", "trace", "eval", "push", "show"):
        assert f"  {cmd} " in out.stdout


def test_every_public_name_resolves_and_is_listed():
    for name in rompatch.__all__:
        assert getattr(rompatch, name) is not None, name
    assert set(rompatch.__all__) <= set(dir(rompatch))


def test_diff_is_the_function_even_after_its_module_is_imported():
    """``rompatch.diff`` is the public function; its module is ``rompatch.checkpoint.diff``."""
    _python(
        "import rompatch, rompatch.checkpoint.extract  # extract imports the rompatch.checkpoint.diff module\n"
        "from rompatch.checkpoint.diff import diff_patches\n"
        "assert callable(rompatch.diff) and rompatch.diff.__module__ == 'rompatch.checkpoint.diff', rompatch.diff\n"
    )


def test_patch_hub_methods_come_from_a_mixin_not_from_monkeypatching():
    """``Patch``'s Hub methods are inherited from ``rompatch.hub.mixin.HubMixin`` (as huggingface_hub's
    ``ModelHubMixin`` does), so they exist as soon as ``rompatch.patch`` is imported, and importing
    the push and pull modules changes nothing on the class."""
    _python(
        "from rompatch.patch import Patch\n"
        "from rompatch.hub.mixin import HubMixin\n"
        "before = dict(vars(Patch))\n"
        "assert issubclass(Patch, HubMixin) and 'from_pretrained' not in vars(Patch)\n"
        "p = Patch.from_pretrained('patches/eiffel-tower-rome.safetensors')\n"
        "assert p.deltas and callable(p.push_to_hub)\n"
        "import rompatch.hub.push, rompatch.hub.pull\n"
        "assert dict(vars(Patch)) == before\n"
    )


def test_ships_its_type_hints():
    """PEP 561: a py.typed marker in the package, put into the wheel by pyproject's package data
    (setuptools 68, the oldest the build allows, does not add it by itself)."""
    assert (REPO / "rompatch" / "py.typed").is_file()
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["rompatch"]


def test_every_error_class_is_exported():
    from rompatch import errors

    classes = {
        n for n, c in vars(errors).items() if isinstance(c, type) and issubclass(c, errors.RompatchError)
    }
    assert classes - set(rompatch.__all__) == set()


def test_public_exports():
    for name in ("load_patched", "push_patch", "pull_patch", "export_peft"):
        assert name in rompatch.__all__ and hasattr(rompatch, name)


def _imported_test_modules(path: Path) -> list[str]:
    """The test modules (``tests.…test_*`` or relative ``.test_*``) that ``path`` imports."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ("." * node.level) + (node.module or "")
            names = [base] + [f"{base}.{a.name}" if node.module else f"{base}{a.name}" for a in node.names]
        else:
            continue
        found += [n for n in names if n.rsplit(".", 1)[-1].startswith("test_")]
    return found


def test_no_test_module_imports_another():
    """Shared helpers live in tests/helpers.py (and the other non-test modules) or in fixtures."""
    offenders = {
        str(p.relative_to(REPO)): names
        for p in sorted((REPO / "tests").rglob("test_*.py"))
        if (names := _imported_test_modules(p))
    }
    assert offenders == {}
