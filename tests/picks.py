"""Comparing a method's answers: a batch's pick against the same view's pick alone."""

import torch

from vtprune.methods import Selection


# A batch's matrix products may sum in another order than one item's (the BLAS picks its kernel by the batch's
# size: on an AVX2 EPYC a merged feature differed from itself alone by an ulp): merged states agree to rounding.
ROUNDING = dict(rtol=1e-5, atol=1e-6)


def assert_same_values(value, alone):
    """Equal, through lists and tuples, tensors dtype for dtype: integer ones bit for bit, floating ones to float
    rounding (ROUNDING)."""
    if isinstance(alone, (list, tuple)):
        assert type(value) is type(alone) and len(value) == len(alone)
        for part, part_alone in zip(value, alone):
            assert_same_values(part, part_alone)
    elif isinstance(alone, torch.Tensor):
        assert isinstance(value, torch.Tensor) and value.dtype == alone.dtype
        exact = not (alone.is_floating_point() or alone.is_complex())
        torch.testing.assert_close(value, alone, **(dict(rtol=0, atol=0) if exact else ROUNDING))
    else:
        assert value == alone


def assert_same_pick(pick, alone):
    """Kept indices equal; a merging Selection's every field equal (its merged states to float rounding)."""
    assert type(pick) is type(alone)
    if isinstance(alone, Selection):
        for field in ("keep", "hidden", "sizes", "destination"):
            assert (getattr(pick, field) is None) == (getattr(alone, field) is None), field
            if getattr(alone, field) is not None:
                assert_same_values(getattr(pick, field), getattr(alone, field))
    else:
        assert pick.tolist() == alone.tolist()
