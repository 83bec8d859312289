"""Editing methods other than the default ROME engine, one sub-package each (as PEFT keeps one per
tuner): its hyperparameter dataclass in ``config.py`` and its algorithm in ``editor.py``. Every
method writes the same patch format (rank-one deltas with keys), so its patches apply, revert,
stack, merge and export like any other.

- ``memit``: MEMIT (Meng et al. 2023), many edits in one batch spread over a range of layers.
"""
