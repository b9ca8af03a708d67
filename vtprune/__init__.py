"""vtprune: training-free visual-token pruning for multimodal LLMs on stock transformers models."""

import importlib
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Each public name's module, imported at the name's first use: the command line answers `vtprune --help` and a
# mistyped option without waiting seconds for torch and transformers.
_MODULE_OF = {
    "MethodInfo": "api", "apply": "api", "methods": "api",
    "Decision": "engine", "EngineError": "engine", "Pruner": "engine", "PruneStats": "engine",
    "UnsupportedUseError": "engine",
    "CompiledPrefill": "engine.compiled", "compile_prefill": "engine.compiled",
}
__all__ = ["CompiledPrefill", "Decision", "EngineError", "MethodInfo", "PruneStats", "Pruner", "UnsupportedUseError",
           "apply", "compile_prefill", "methods"]

if TYPE_CHECKING:  # what type checkers and editors read
    from .api import MethodInfo, apply, methods
    from .engine import Decision, EngineError, Pruner, PruneStats, UnsupportedUseError
    from .engine.compiled import CompiledPrefill, compile_prefill


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'vtprune' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """`vtprune.methods` is the function listing the methods; importing the subpackage of the same name (the methods'
    code) must not put the module in its place, as Python's import system does for a package's submodules."""

    def __setattr__(self, name, value):
        if name == "methods" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
