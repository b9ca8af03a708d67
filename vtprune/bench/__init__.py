from .presets import PRESETS, build_preset

__all__ = ["PRESETS", "build_preset"]
