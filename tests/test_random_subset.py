"""random: each image keeps a uniformly drawn subset of its tokens, one draw per (seed, image rank in its sample).

No authors' code to follow: the properties a reference floor needs are tested instead (every subset equally
likely, a draw that depends on the seed and the image's rank and on nothing the image holds).
"""

import torch

from vtprune.methods import ImageView
from vtprune.methods.random_subset import RandomSubset


def draw(seed: int, image_index: int = 0, tokens: int = 64, keep: int = 16, hidden=None) -> set[int]:
    hidden = torch.randn(tokens, 4) if hidden is None else hidden
    view = ImageView.of_grid(hidden, 8, tokens // 8, keep=keep, layer=0, stage=0, image_index=image_index,
                             sizes=torch.ones(tokens))
    picked = RandomSubset(RandomSubset.Options(seed=seed)).select(view).tolist()
    assert len(picked) == len(set(picked)) == keep and all(0 <= i < tokens for i in picked)
    return set(picked)


def test_every_token_is_kept_as_often_over_seeds():
    """Over 2000 seeds each of 64 tokens is kept about 2000 * 16/64 = 500 times (binomial sd 19; bounds at 6 sd),
    and a kept token says nothing of its neighbour's fate (a draw of runs, or of the first tokens, fails)."""
    draws = [draw(seed) for seed in range(2000)]
    counts = torch.zeros(64)
    for kept in draws:
        counts[list(kept)] += 1
    assert ((counts - 500).abs() < 120).all(), counts
    both = sum(i in kept and i + 1 in kept for kept in draws for i in range(63))
    expected = 2000 * 63 * (16 / 64) * (15 / 63)  # two given tokens both in a 16-subset of 64
    assert abs(both - expected) < 0.1 * expected


def test_the_draw_follows_the_seed_and_the_images_rank_and_not_its_content():
    assert draw(0) == draw(0, hidden=torch.zeros(64, 4)) == draw(0, hidden=torch.randn(64, 4))
    assert draw(0) != draw(1)
    assert draw(0, image_index=0) != draw(0, image_index=1)  # two images of one sample are not cut alike
    assert draw(7, image_index=1) == draw(7, image_index=1)
