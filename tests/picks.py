"""Comparing a method's answers: a batch's pick against the same view's pick alone."""

import torch

from vtprune.methods import Selection


def assert_same_pick(pick, alone):
    """Equal bit for bit and dtype for dtype: kept indices, or a merging Selection's every field."""
    assert type(pick) is type(alone)
    if isinstance(alone, Selection):
        for field in ("keep", "hidden", "sizes", "destination"):
            assert (getattr(pick, field) is None) == (getattr(alone, field) is None), field
            if getattr(alone, field) is not None:
                torch.testing.assert_close(getattr(pick, field), getattr(alone, field), rtol=0, atol=0)
                assert getattr(pick, field).dtype == getattr(alone, field).dtype
    else:
        assert pick.tolist() == alone.tolist()
