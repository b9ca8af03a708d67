"""A benchmark's video files as the frames a model is shown: `count` frames sampled uniformly, as lmms-eval's
video loaders sample them (``lmms_eval/models/model_utils/load_video.py``: min(total, count) indices
``np.linspace(0, total - 1, n, dtype=int)`` over the stream's frame count), decoded with PyAV. Only the picked
frames are converted and kept (an hour of video holds ~10^5 frames), and the last few videos read are kept
(a benchmark asks several questions about each video in a row)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np


def read_frames(path: str | Path, count: int) -> np.ndarray:
    """[n, H, W, 3] uint8 RGB frames of the video at `path`, n = min(its frames, count), evenly spaced from the
    first frame to the last."""
    return _read_frames(str(path), count).copy()  # the cached array stays as read


def shown_frames(path: str | Path, count: int) -> int:
    """How many frames `read_frames` gives of this video: min(its frames, count)."""
    return min(_frame_total(str(path)), count)


@lru_cache(maxsize=None)
def _frame_total(path: str) -> int:
    import av  # here, not by every command

    try:
        with av.open(path) as container:
            total = container.streams.video[0].frames  # 0 where the container does not say
        if not total:
            with av.open(path) as container:
                total = sum(1 for _ in container.decode(video=0))
    except (av.error.FFmpegError, IndexError) as error:
        raise ValueError(f"{path}: not a readable video ({error}); replace it with the benchmark's file") from None
    return total


@lru_cache(maxsize=8)
def _read_frames(path: str, count: int) -> np.ndarray:
    import av

    total = _frame_total(path)
    try:
        picked = set(np.linspace(0, total - 1, min(total, count), dtype=int).tolist()) if total else set()
        frames = []
        with av.open(path) as container:
            for index, frame in enumerate(container.decode(video=0)):
                if index in picked:
                    frames.append(frame.to_ndarray(format="rgb24"))
    except (av.error.FFmpegError, IndexError) as error:
        raise ValueError(f"{path}: not a readable video ({error}); replace it with the benchmark's file") from None
    if not frames:
        raise ValueError(f"{path}: a video without frames; replace it with the benchmark's file")
    return np.stack(frames)
