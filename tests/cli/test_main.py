"""`rompatch --help`, the command table, and error handling (one line, or a traceback with -v)."""

from __future__ import annotations

from rompatch.cli.main import cli


def test_help_lists_commands(runner):
    r = runner.invoke(cli, ["--help"])
    assert r.exit_code == 0
    for cmd in ("show", "predict"):
        assert cmd in r.output


def test_help_table_matches_the_commands():
    """``rompatch --help`` lists commands from main.COMMANDS without importing them; every entry
    names the module that defines the command and its real one-line help, and no command is missing."""
    import importlib
    import pkgutil

    import rompatch.cli as pkg
    from rompatch.cli.main import COMMANDS

    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name == "main":
            continue
        mod = importlib.import_module(f"rompatch.cli.{info.name}")
        for cmd in getattr(mod, "COMMANDS", ()):
            found[cmd.name] = (info.name, cmd.get_short_help_str(limit=1000))
    assert found == COMMANDS


def test_verbose_shows_traceback(runner, tmp_path):
    f = tmp_path / "junk.safetensors"
    f.write_bytes(b"junk")
    r = runner.invoke(cli, ["-v", "show", str(f)])
    assert r.exit_code != 0 and "Traceback" in r.stderr
