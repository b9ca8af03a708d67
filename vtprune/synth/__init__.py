"""Synthetic VQA benchmark: small objects on cluttered backgrounds, six question classes."""

from .generator import ANSWERS, CLASSES, Sample, generate, make_sample, make_text, vocabulary, words

__all__ = ["ANSWERS", "CLASSES", "Sample", "generate", "make_sample", "make_text", "vocabulary", "words"]
