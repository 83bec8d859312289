"""Sharing patches through the Hugging Face Hub, and exporting them as PEFT LoRA adapters.

- ``transfer``: Hub references, the one mapping of huggingface_hub errors to ``HubError``, downloads;
- ``modelcard``: the README.md a pushed repo gets;
- ``peft``: exact LoRA adapters from patches.

The public functions are ``rompatch.pull_patch``, ``rompatch.push_patch`` and ``rompatch.export_peft``.
This ``__init__`` imports nothing, so the modules below ``rompatch.patch`` can use ``transfer``.
"""
