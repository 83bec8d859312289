"""Thin click commands; one module per group. Entry point: ``rompatch.cli.main:main``.

The command modules import only click and light modules (constants, errors, arch, request) at the
top; each command imports the library modules it calls in its body. ``rompatch --help`` imports
every command module, so this keeps it from importing torch.
"""
