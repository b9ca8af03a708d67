"""The transformers releases vtprune is tested on, and the error it raises when an assumption breaks.

The range must equal the transformers requirement in pyproject.toml (a test checks it);
raise the cap only when the suite passes on the new release (`make compat`).
"""

from __future__ import annotations

import transformers

TESTED_TRANSFORMERS = ">=5.17,<5.25"


class EngineError(RuntimeError):
    """Something the engine relies on did not hold: vtprune stops rather than run unpruned or wrong."""

    def __init__(self, problem: str):
        super().__init__(
            f"{problem} (transformers {transformers.__version__}; vtprune is tested with "
            f"transformers{TESTED_TRANSFORMERS}: outside that range, install a tested release)"
        )
