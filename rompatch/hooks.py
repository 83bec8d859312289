"""Instrumentation as context managers, in the style of baukit's ``nethook``.

Hooks never outlive their ``with`` block. ``stop=True`` raises after the last traced module ran,
so only a prefix of the network is computed (what statistics and key collection need).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn


class StopForward(Exception):
    """Raised inside a forward pass to stop it early; caught by Trace/TraceDict on exit."""


def _first_tensor(x: Any) -> Any:
    return x[0] if isinstance(x, tuple) else x


class Trace(AbstractContextManager):
    """Hook one module. Keeps its input/output and optionally rewrites its output.

    ``edit_output(output, name) -> output`` may return a replacement. With ``stop=True`` the
    forward pass ends right after this module ran (``StopForward`` is swallowed on exit).
    """

    def __init__(
        self,
        model: nn.Module,
        name: str,
        *,
        retain_input: bool = False,
        retain_output: bool = True,
        edit_output: Callable[[Any, str], Any] | None = None,
        edit_input: Callable[[Any, str], Any] | None = None,
        detach: bool = True,
        stop: bool = False,
    ) -> None:
        self.name = name
        self.input: torch.Tensor | None = None
        self.output: Any = None
        module = model.get_submodule(name)
        handles = []

        if edit_input is not None or retain_input:

            def pre_hook(mod, args):
                x = args[0]
                if edit_input is not None:
                    x = edit_input(x, name)
                    args = (x, *args[1:])
                if retain_input:
                    self.input = x.detach() if detach else x
                return args

            handles.append(module.register_forward_pre_hook(pre_hook))

        def hook(mod, args, output):
            if edit_output is not None:
                output = edit_output(output, name)
            if retain_output:
                out = _first_tensor(output)
                self.output = out.detach() if detach else out
            if stop:
                raise StopForward()
            return output

        handles.append(module.register_forward_hook(hook))
        self._handles = handles

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return exc_type is not None and issubclass(exc_type, StopForward)


class TraceDict(AbstractContextManager, dict):
    """Trace several modules at once: ``td[name]`` is that module's Trace.

    With ``stop=True`` the forward pass stops after the last of ``names`` (in the given order) ran.
    """

    # The keyword arguments are Trace's, spelled out again (as baukit's TraceDict does) so that the
    # signature documents itself and type checkers see it; each is passed through unchanged.
    def __init__(
        self,
        model: nn.Module,
        names: Iterable[str],
        *,
        retain_input: bool = False,
        retain_output: bool = True,
        edit_output: Callable[[Any, str], Any] | None = None,
        edit_input: Callable[[Any, str], Any] | None = None,
        detach: bool = True,
        stop: bool = False,
    ) -> None:
        super().__init__()
        names = list(dict.fromkeys(names))
        try:
            for i, n in enumerate(names):
                self[n] = Trace(
                    model,
                    n,
                    retain_input=retain_input,
                    retain_output=retain_output,
                    edit_output=edit_output,
                    edit_input=edit_input,
                    detach=detach,
                    stop=stop and i == len(names) - 1,
                )
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for t in self.values():
            t.close()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return exc_type is not None and issubclass(exc_type, StopForward)
