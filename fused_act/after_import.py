"""Running a registration as soon as a module of torch's is imported, without importing it:
``when_imported(name, callback)``.

fused_act registers rules in parts of torch that are costly to import and that most users never
load (DTensor's sharding propagation).  ``import fused_act`` must not
pay for them, and a user who loads them later must still find the rules in place.
"""

import contextlib
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable


class AfterImport(importlib.abc.MetaPathFinder):
    """An import hook: lets module ``name`` load as usual, then runs its ``callbacks`` in
    order, before the module is handed to whoever imported it.  It leaves ``sys.meta_path``
    once the module has run, not when asked for its spec: ``importlib.util.find_spec`` asks
    without loading the module."""

    def __init__(self, name: str) -> None:
        self.name, self.callbacks = name, []

    def find_spec(self, name: str, path: object, target: object = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if name != self.name:
            return None
        for finder in sys.meta_path:  # the spec the import would get without this hook
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
        else:
            return None
        if spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: object) -> None:
            exec_module(module)
            with contextlib.suppress(ValueError):  # another load of the module removed it
                sys.meta_path.remove(self)
            for callback in self.callbacks:
                callback()

        # the loader is this spec's own instance; the module keeps it as its __loader__
        spec.loader.exec_module = exec_then_register
        return spec


def when_imported(name: str, callback: Callable[[], None]) -> None:
    """Run ``callback`` now if module ``name`` is imported, else right after its first import
    (once, however often it is asked for)."""
    if name in sys.modules:
        callback()
        return
    hook = next((f for f in sys.meta_path if isinstance(f, AfterImport) and f.name == name), None)
    if hook is None:
        hook = AfterImport(name)
        sys.meta_path.insert(0, hook)
    if callback not in hook.callbacks:
        hook.callbacks.append(callback)
