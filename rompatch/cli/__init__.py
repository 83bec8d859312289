"""Thin click commands; one module per group. Entry point: ``rompatch.cli.main:main``."""
