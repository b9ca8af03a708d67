"""The transformers releases vtprune is tested on, and the error it raises when an assumption breaks.

The range must equal the transformers requirement in pyproject.toml (a test checks it);
raise the cap only when the suite passes on the new release (`make compat`).
"""

from __future__ import annotations

import inspect
import warnings

import transformers
from packaging.specifiers import SpecifierSet

TESTED_TRANSFORMERS = ">=5.17,<5.25"


class EngineError(RuntimeError):
    """Something the engine relies on did not hold: vtprune stops rather than run unpruned or wrong."""

    def __init__(self, problem: str):
        version = transformers.__version__
        if version in SpecifierSet(TESTED_TRANSFORMERS):
            advice = "a release vtprune is tested with: a setting of this model it does not handle, please report it"
        else:
            advice = f"vtprune is tested with transformers{TESTED_TRANSFORMERS}: install a tested release"
        super().__init__(f"{problem} (transformers {version}, {advice})")


class UnsupportedUseError(EngineError):
    """A call the engine cannot serve as it was made (continuing a pruned cache after `remove()`, regrouping its
    rows, assisted decoding that crops the pruned prompt, ...): the message says what to do instead. The caller's
    to change, not a bug to report, so it names no transformers release."""

    def __init__(self, problem: str):
        RuntimeError.__init__(self, problem)


def warn_if_untested() -> None:
    """A warning where the installed transformers is outside the tested range (pip lets a later upgrade past the
    cap through): the engine checks what it relies on, but a change it cannot see would give wrong answers."""
    if transformers.__version__ not in SpecifierSet(TESTED_TRANSFORMERS):
        warnings.warn(
            f"transformers {transformers.__version__} is outside the range vtprune is tested with "
            f"(transformers{TESTED_TRANSFORMERS}): install a tested release, or run vtprune's suite on this one first",
            stacklevel=3,
        )


def require_arguments(module, names: tuple[str, ...]) -> None:
    """An EngineError unless module's forward takes each of `names`: the engine reads and rewrites them in the
    calls it intercepts, and a renamed one would reach the module twice or not at all."""
    taken = inspect.signature(module.forward).parameters
    if all(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in taken.values()):
        return  # a wrapper that says nothing of what it passes on (the calls' own checks still hold)
    missing = [name for name in names if name not in taken]
    if missing:
        raise EngineError(f"{type(module).__name__}.forward takes no {', '.join(missing)} argument, which the engine "
                          "passes it")


def takes_encoded_features(model) -> bool:
    """Whether model's forward takes images encoded ahead as mm_encoder_outputs (transformers 5.23+)."""
    return "mm_encoder_outputs" in inspect.signature(model.forward).parameters
