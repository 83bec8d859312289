"""Thin click commands; one module per group. Entry point: ``rompatch.cli.main:main``.

Each command module lists its commands in ``COMMANDS`` and imports the library at its top. The
group in ``main.py`` loads a module only when one of its commands runs, and lists the commands from
its own table, so ``rompatch --help`` does not import torch.
"""
