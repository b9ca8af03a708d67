"""A benchmark's video files as the frames a model is shown: `count` frames sampled uniformly, as lmms-eval's
video loaders sample them (``lmms_eval/models/model_utils/load_video.py``: min(total, count) indices
``np.linspace(0, total - 1, n, dtype=int)``), decoded with PyAV."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _av():
    try:
        import av
    except ImportError:
        raise ImportError("reading benchmark videos needs PyAV: pip install av") from None
    return av


def read_frames(path: str | Path, count: int) -> np.ndarray:
    """[n, H, W, 3] uint8 RGB frames of the video at `path`, n = min(its frames, count), evenly spaced from the
    first frame to the last."""
    av = _av()
    try:
        with av.open(str(path)) as container:
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    except (av.error.FFmpegError, IndexError) as error:
        raise ValueError(f"{path}: not a readable video ({error}); replace it with the benchmark's file") from None
    if not frames:
        raise ValueError(f"{path}: a video without frames; replace it with the benchmark's file")
    picked = np.linspace(0, len(frames) - 1, min(len(frames), count), dtype=int)
    return np.stack([frames[i] for i in picked])
