"""MEMIT (Meng et al., "Mass-Editing Memory in a Transformer", ICLR 2023): ``MEMITEditor``,
``MEMITHyperParams``, ``create_memit_patch``."""

from .config import MEMITHyperParams
from .editor import MEMITEditor, create_memit_patch

__all__ = ["MEMITEditor", "MEMITHyperParams", "create_memit_patch"]
