"""95% intervals of the benchmarks' headline scores: a percentile bootstrap over each metric's independent units.

Method. A benchmark's samples are judged once (`metrics.sample_outcomes`, the same parsing and rules `score`
uses) and reduced to one row of numbers per *independent unit* (`units`); the units are then resampled with
replacement (``RESAMPLES`` times, a numpy Generator seeded from ``SEED`` and the task name), each resample's
headline is recomputed in numpy from its units' summed rows, and the 2.5th and 97.5th percentiles of those
headlines are the interval (`score_interval`). No Python scorer runs per resample: a resample is a matrix of
how often each unit was drawn, and its sums are one matrix product.

Units and strata, per task (resampling is within each stratum, which keeps its size as the benchmark fixes it):

=============  ======================================  =================================================
task           unit (row of numbers)                   headline from the summed rows
=============  ======================================  =================================================
textvqa        a sample (its VQA soft accuracy)        100 x mean
vizwiz         a sample (its VQA soft accuracy)        100 x mean
gqa            a sample (hit)                          100 x mean
scienceqa_img  a sample (hit)                          100 x mean
ocrbench       a sample (hit)                          sum (points)
mmbench_en/cn  a question, all its rotations together  100 x mean (right only if every rotation is)
               (hit of the question)
mme            an image, its two questions together    sum over subtasks of acc + acc+, acc = 100 x right /
               (questions right, both right);          (2 x images), acc+ = 100 x both right / images
               stratum: its subtask
pope           a sample (TP, FP, FN); stratum: split   F1 x 100: lmms-eval pooled over the splits, llava the
                                                       mean of the splits' F1 (`metrics._pope_samples`)
videomme       a video, all its questions together     100 x right / asked (lmms-eval's cluster_key is the
               (questions right, questions asked)      video: its questions are correlated)
=============  ======================================  =================================================

Decisions:

* Percentile bootstrap (no normal approximation: F1, MME's sums and ratios are not symmetric near their
  bounds), 1000 resamples: the Monte-Carlo error of a 2.5% percentile from 1000 resamples is about 4% of the
  interval's half-width (e.g. +-0.1 on GQA's +-0.8), and a fixed seed (0, mixed with the task name so tasks
  draw independent streams) makes a report reproducible.
* Units, not rows: MMBench's circular rotations and MME's question pairs are scored jointly, so a resample
  draws them whole; resampling rows would count one question four times as independent evidence.
* The resamples depend only on the task, the seed and the units' strata, not on the config: every config
  that answered the same samples is resampled on the same units. That pairs them, which is what makes the
  normalized average's interval honest (`normalized_interval`): pruned and unpruned answered the same
  questions, so per resample the ratio pruned / unpruned is taken on the same draw of each benchmark, and the
  benchmarks (separate data sets) are resampled independently of each other.
* POPE is resampled within its splits (3000 questions each in the full set) under both rules, as MME within
  its subtasks: the design fixes those sizes, and the llava headline (a mean over splits) needs every split
  in every resample.
* OCRBench's points are a sum: the interval is in points too (the count a resample of the same size gets).
* The point score printed is `score`'s, not the bootstrap mean; `units`' numpy headline reproduces it
  (tests check every task, POPE and MME under both rules, and that each resample's number is `score` of the
  resampled samples).
* The normalized average has no interval where a resample leaves an unpruned score at 0 (the ratio is
  undefined there) or the configs answered different samples (nothing to pair); the report then prints the
  number alone.

* Where the units are each right or wrong and the headline counts them (GQA, ScienceQA, MMBench's questions,
  OCRBench's points), the interval is Wilson's (`headline_interval`), not the percentiles: a percentile
  bootstrap collapses to the point at 0% and 100% (every resample is the same) and runs narrow near them (a
  helper's simulation: 39% coverage at 99% accuracy on 50 units, 64% on 100, 86% on 200), where Wilson's holds.

Limits: the other headlines' percentile intervals, and the normalized average's, share that weakness near a
score's bound on a few dozen units (77% coverage on 50 units at 99.5%); on the real benchmarks' thousands of
samples it does not show.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from .metrics import LLAVA, MME_SUBTASKS, Outcomes, sample_outcomes

__all__ = ["RESAMPLES", "SEED", "LEVEL", "Units", "units", "resample_counts", "bootstrap", "percentile_interval",
           "wilson_interval", "paired_difference", "headline_interval", "score_interval", "normalized_interval"]

RESAMPLES = 1000
SEED = 0
LEVEL = 0.95
_CHUNK = 2_000_000  # draws held at once (resamples x units of a stratum): bounds memory on large benchmarks


@dataclass(frozen=True)
class Units:
    """One benchmark's independent units: ``values`` (units x fields), each unit's stratum (``strata``, an
    index into ``names``), and the headline computed from per-stratum sums (``headline``)."""

    task: str
    values: np.ndarray
    strata: np.ndarray
    names: tuple[str, ...]
    headline: Callable[[np.ndarray, np.ndarray], np.ndarray]  # (sums (..., strata, fields), sizes) -> (...)

    def __len__(self) -> int:
        return len(self.values)

    @property
    def sizes(self) -> np.ndarray:
        return np.bincount(self.strata, minlength=len(self.names))

    def point(self) -> float:
        """The headline of the units as they are (every unit once): `score`'s ``score``."""
        sums = np.zeros((len(self.names), self.values.shape[1]))
        np.add.at(sums, self.strata, self.values)
        return float(self.headline(sums, self.sizes))


def _mean_x100(sums: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    return 100.0 * sums[..., 0, 0] / sizes[0]


def _points(sums: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    return sums[..., 0, 0]


def _right_of_asked_x100(sums: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    return 100.0 * sums[..., 0, 0] / sums[..., 0, 1]


def _mme_total(sums: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    acc = 100.0 * sums[..., 0] / (2 * sizes)
    acc_plus = 100.0 * sums[..., 1] / sizes
    return (acc + acc_plus).sum(axis=-1)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den is 0 (`metrics._pope_block`'s rule)."""
    return np.divide(num, den, out=np.zeros_like(num, dtype=float), where=den != 0)


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return _ratio(2 * precision * recall, precision + recall)


def _pope_pooled(sums: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    tp, fp, fn = np.moveaxis(sums.sum(axis=-2), -1, 0)
    return 100.0 * _f1(tp, fp, fn)


def _pope_per_split(sums: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    tp, fp, fn = np.moveaxis(sums, -1, 0)
    return 100.0 * _f1(tp, fp, fn).mean(axis=-1)


def _grouped(keys: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """(unit of each row, first row of each unit) for rows sharing a key; units in order of first appearance."""
    ids: dict = {}
    unit = np.fromiter((ids.setdefault(k, len(ids)) for k in keys), dtype=np.intp, count=len(keys))
    return unit, np.unique(unit, return_index=True)[1]


def units(outcomes: Outcomes) -> Units:
    """The independent units of one task's judged samples (see the module's table)."""
    task, cols = outcomes.task, outcomes.columns
    one = ("all",)
    if task in ("textvqa", "vizwiz", "gqa", "scienceqa_img", "ocrbench"):
        x = np.asarray(cols["accuracy" if task in ("textvqa", "vizwiz") else "hit"], dtype=float)[:, None]
        return Units(task, x, np.zeros(len(x), dtype=np.intp), one, _points if task == "ocrbench" else _mean_x100)
    if task in ("mmbench_en", "mmbench_cn"):
        unit, _ = _grouped(cols["question"])
        wrong = np.bincount(unit, weights=~np.asarray(cols["hit"], dtype=bool))
        x = (wrong == 0).astype(float)[:, None]
        return Units(task, x, np.zeros(len(x), dtype=np.intp), one, _mean_x100)
    if task == "mme":
        order = [c for kind in MME_SUBTASKS.values() for c in kind]
        names = tuple(c for c in order if c in set(cols["subtask"]))
        unit, first = _grouped(list(zip(cols["subtask"], cols["image"])))
        right = np.bincount(unit, weights=np.asarray(cols["hit"], dtype=float))
        x = np.stack([right, (right == 2).astype(float)], axis=1)  # metrics checked: two questions per image
        strata = np.asarray([names.index(cols["subtask"][r]) for r in first], dtype=np.intp)
        return Units(task, x, strata, names, _mme_total)
    if task == "pope":
        parsed, gold = np.asarray(cols["parsed"]), np.asarray(cols["gold"])
        x = np.stack([(parsed == "yes") & (gold == "yes"), (parsed == "yes") & (gold == "no"),
                      (parsed == "no") & (gold == "yes")], axis=1).astype(float)
        names, strata = np.unique(np.asarray(cols["split"]), return_inverse=True)
        return Units(task, x, strata.reshape(-1).astype(np.intp), tuple(names),
                     _pope_per_split if outcomes.scoring == LLAVA else _pope_pooled)
    if task == "videomme":
        unit, _ = _grouped(cols["video"])
        x = np.stack([np.bincount(unit, weights=np.asarray(cols["hit"], dtype=float)),
                      np.bincount(unit).astype(float)], axis=1)
        return Units(task, x, np.zeros(len(x), dtype=np.intp), one, _right_of_asked_x100)
    raise ValueError(f"no interval for task {task!r}")


def _rng(task: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(task.encode())])


def resample_counts(u: Units, resamples: int = RESAMPLES, seed: int = SEED):
    """Yield (resamples in the chunk, {stratum: counts}) chunks: counts[b, j] is how often resample b drew the
    stratum's j-th unit (units drawn with replacement, as many as the stratum has). Deterministic in the task,
    the seed and the strata: every config with the same units gets the same draws."""
    rng = _rng(u.task, seed)
    sizes = u.sizes
    chunk = max(1, min(resamples, _CHUNK // max(1, int(sizes.max()))))
    done = 0
    while done < resamples:
        b = min(chunk, resamples - done)
        counts = {}
        for s, n in enumerate(sizes):
            draws = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
            counts[s] = np.bincount(draws.ravel(), minlength=b * n).reshape(b, n).astype(float)
        yield b, counts
        done += b


def bootstrap(group: Units | Sequence[Units], resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """The headline of each resample: shape (resamples,) for one Units, (configs, resamples) for several that
    share a task and strata (the same samples answered by several configs: one draw serves all, paired)."""
    single = isinstance(group, Units)
    members = [group] if single else list(group)
    u = members[0]
    for other in members[1:]:
        if other.task != u.task or not np.array_equal(other.strata, u.strata):
            raise ValueError("bootstrap: configs resampled together must have the same task and units")
    fields = u.values.shape[1]
    rows = [np.flatnonzero(u.strata == s) for s in range(len(u.names))]
    stacked = np.concatenate([m.values for m in members], axis=1)  # units x (configs * fields)
    out = np.empty((len(members), resamples))
    done = 0
    for b, counts in resample_counts(u, resamples, seed):
        sums = np.stack([counts[s] @ stacked[rows[s]] for s in range(len(rows))], axis=1)  # b x strata x C*f
        for c, m in enumerate(members):
            out[c, done:done + b] = m.headline(sums[..., c * fields:(c + 1) * fields], u.sizes)
        done += b
    return out[0] if single else out


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The central `level` interval of bootstrap values (their percentiles)."""
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def wilson_interval(correct: int, total: int, level: float = LEVEL) -> tuple[float, float]:
    """The Wilson score interval of a rate correct / total: unlike p +- z sd (or a percentile bootstrap) it stays
    inside [0, 1] and is honest at 0% and 100%, and on a few dozen samples."""
    if total == 0:
        return (0.0, 1.0)
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    # It holds p exactly: at 0% and 100% rounding left a bound a hair inside (0.9999999999999999 at n = 6, 21, ...)
    return (min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half)))


def paired_difference(first: Sequence[bool], second: Sequence[bool], level: float = LEVEL) -> tuple[float, tuple]:
    """The difference of two accuracies on the same samples (first - second, as rates) and its `level` interval:
    Newcombe's for paired proportions (1998, his method 10), the two Wilson intervals combined through the
    pairs' correlation. Paired, it is much narrower than the two intervals side by side where both configs get
    most samples alike, which is why two overlapping intervals do not mean "no difference"."""
    if len(first) != len(second) or not first:
        raise ValueError("paired_difference needs the answers of two configs on the same, non-empty samples")
    n = len(first)
    both = sum(1 for x, y in zip(first, second) if x and y)
    only_first = sum(1 for x, y in zip(first, second) if x and not y)
    only_second = sum(1 for x, y in zip(first, second) if y and not x)
    neither = n - both - only_first - only_second
    p1, p2 = (both + only_first) / n, (both + only_second) / n
    (l1, u1), (l2, u2) = wilson_interval(both + only_first, n, level), wilson_interval(both + only_second, n, level)
    margins = (both + only_first) * (only_second + neither) * (both + only_second) * (only_first + neither)
    product = both * neither - only_first * only_second
    if product > 0:  # Newcombe's continuity correction of the correlation (without it, too narrow where two
        product = max(product - n / 2, 0)  # configs answer nearly every sample alike: 90% coverage at n = 240)
    phi = product / math.sqrt(margins) if margins else 0.0
    below = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    above = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    difference = p1 - p2
    return difference, (max(-1.0, difference - below), min(1.0, difference + above))


def headline_interval(u: Units, resampled: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The `level` interval of u's headline from its resamples (`bootstrap`), or Wilson's where the headline
    counts the hits of units that are each right or wrong (GQA, ScienceQA, MMBench's questions, OCRBench's
    points): there a percentile bootstrap collapses to the point at 0% and 100% and runs narrow near them on a
    few hundred units, while Wilson's holds its level."""
    hits = u.values[:, 0]
    if u.headline in (_mean_x100, _points) and len(u.names) == 1 and np.isin(hits, (0, 1)).all():
        n = len(hits)
        low, high = wilson_interval(int(hits.sum()), n, level)
        return float(u.headline(np.array([[low * n]]), u.sizes)), float(u.headline(np.array([[high * n]]), u.sizes))
    return percentile_interval(resampled, level)


def score_interval(task: str, predictions, references, scoring: str = "lmms-eval", resamples: int = RESAMPLES,
                   seed: int = SEED, level: float = LEVEL) -> tuple[float, float]:
    """The `level` interval of `metrics.score(task, ...)["score"]`, in its unit."""
    u = units(sample_outcomes(task, predictions, references, scoring))
    return headline_interval(u, bootstrap(u, resamples, seed), level)


def normalized_interval(pruned: Mapping[str, np.ndarray], unpruned: Mapping[str, np.ndarray],
                        level: float = LEVEL) -> tuple[float, float] | None:
    """The interval of the normalized average (x100) from paired bootstraps: per task, the pruned and unpruned
    headlines of the same resamples (`bootstrap` of both configs' units). None when a resample leaves an
    unpruned headline at 0 (the ratio is undefined there) or the tasks differ."""
    if set(pruned) != set(unpruned) or not pruned:
        return None
    if any((unpruned[t] == 0).any() for t in pruned):
        return None
    ratios = np.mean([pruned[t] / unpruned[t] for t in pruned], axis=0)
    return percentile_interval(100 * ratios, level)
