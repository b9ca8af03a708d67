"""Official benchmark metrics as pure functions: answers (strings) and ground truth in, named scores out.

No model is involved: `score(task, predictions, references, scoring=...)` scores answers a model already
gave, so every rule can be checked on its own. `predictions` is a sequence of strings (one generated answer
per sample, ``None`` read as ``""``); `references` is a sequence of mappings holding that benchmark's
ground-truth fields under the names its lmms-eval / HF-datasets copy uses (aliases from LLaVA's own files
are accepted where noted).

Two named scoring rules exist where the two evaluation paths people report with differ:

* ``"lmms-eval"``: lmms-eval 0.7.3's task code (``lmms_eval/tasks/<task>/utils.py`` and the shared
  ``lmms_eval/tasks/_task_utils/*``), checked against the published 0.7.3 wheel.
* ``"llava"``: the scripts of haotian-liu/LLaVA that most pruning papers report with
  (``llava/eval/eval_pope.py``, ``llava/eval/m4c_evaluator.py``, ``llava/eval/eval_science_qa.py``,
  ``scripts/convert_gqa_for_eval.py`` + GQA's ``eval.py``, MME's ``eval_tool/calculation.py``).
  LLaVA's generation loop (``model_vqa_loader.py``) strips every answer before saving it, so the
  ``llava`` rules strip too.

Tasks and their rules (``SCORING_RULES``):

=============  =====================  =======================================================
task           rules                  headline ``score``
=============  =====================  =======================================================
textvqa        lmms-eval, llava       VQA accuracy x100 (the two rules compute the same number)
vizwiz         lmms-eval              VQA accuracy x100 (LLaVA only writes a test-server upload)
gqa            lmms-eval, llava       exact-match accuracy x100
pope           lmms-eval, llava       F1 x100 (lmms-eval: pooled; llava: mean over splits)
mme            lmms-eval, llava       perception + cognition totals (max 2800)
mmbench_en/cn  lmms-eval              circular accuracy x100 (LLaVA submits to the server)
scienceqa_img  lmms-eval, llava       option accuracy x100
ocrbench       lmms-eval              points (one per question, 1000 in the full set)
videomme       lmms-eval              option accuracy x100 (LLaVA has no Video-MME script)
=============  =====================  =======================================================

Every result dict has ``score`` (the number papers print, in their unit) next to the named sub-scores;
fractions (accuracy, precision, recall, F1, ratios) are in [0, 1]. `normalized_average` averages
pruned/unpruned ``score`` ratios across benchmarks.

Every metric runs in two stages: each sample is parsed and judged once (`sample_outcomes`: per-sample
columns such as a hit, a soft accuracy, a parsed yes/no), then the columns are aggregated (`score_outcomes`).
``score`` is the two in a row; `vtprune.eval.intervals` bootstraps the headline from the same columns.

Answer normalisation shared by several rules (EvalAI's VQA normaliser, lmms-eval's option-letter extractor)
lives in `vtprune.eval.answer_normalization`.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .answer_normalization import extract_mcq_answer, normalize_vqa_answer, vqa_soft_accuracy
from .fields import NotAString, NotAStringList, _missing, integer, listed_option, string_list

__all__ = [
    "BadReference",
    "SCORING_RULES", "TASK_ALIASES", "canonical_task", "score", "normalized_average", "relative_scores",
    "Outcomes", "sample_outcomes", "score_outcomes",
    "normalize_vqa_answer", "vqa_soft_accuracy", "normalize_gqa_answer",
    "parse_pope_answer", "parse_mme_answer", "extract_mmbench_option", "extract_mcq_answer",
    "parse_scienceqa_option", "ocrbench_match",
    "MME_SUBTASKS", "OCRBENCH_CATEGORIES", "POPE_SPLITS",
]

LMMS_EVAL = "lmms-eval"
LLAVA = "llava"


# ---------------------------------------------------------------------------------------------------------
# shared input checks


class BadReference(ValueError):
    """A reference row the metric cannot score; `index` is its position among the references, so a caller that
    knows where the rows came from (a file's line, a benchmark's row) can say so."""

    def __init__(self, task: str, index: int, problem: str):
        super().__init__(f"{task}: reference {index} {problem}")
        self.task, self.index, self.problem = task, index, problem


def _check_inputs(predictions, references, task: str) -> tuple[list[str], list[Mapping]]:
    if isinstance(predictions, str):
        raise ValueError(f"{task}: predictions must be a sequence of strings, not one string")
    preds = list(predictions)
    refs = list(references)
    if len(preds) != len(refs):
        raise ValueError(f"{task}: {len(preds)} predictions but {len(refs)} references")
    if not preds:
        raise ValueError(f"{task}: no predictions to score")
    out = []
    for i, p in enumerate(preds):
        if p is None:
            p = ""
        if not isinstance(p, str):
            raise ValueError(f"{task}: prediction {i} is {type(p).__name__}, expected a string")
        out.append(p)
    for i, r in enumerate(refs):
        if not isinstance(r, Mapping):
            raise BadReference(task, i, f"is {type(r).__name__}, expected a mapping of fields")
    return out, refs


def _field(ref: Mapping, i: int, task: str, *names: str):
    """The first of `names` present (and not None) in reference row `i`, or a ValueError naming them."""
    for n in names:
        if n in ref and ref[n] is not None:
            return ref[n]
    alts = " or ".join(repr(n) for n in names)
    raise BadReference(task, i, f"has no field {alts}")


def _text_field(ref: Mapping, i: int, task: str, name: str) -> str:
    """Field `name` of reference row `i`, which must be a string."""
    value = _field(ref, i, task, name)
    if not isinstance(value, str):
        raise BadReference(task, i, f"field {name!r} is {type(value).__name__} {value!r}, expected a string")
    return value


def _integer(raw, i: int, task: str, name: str, expected: str) -> int:
    """Field `name`'s value `raw` as an integer, read as the loaders read one (`fields.integer`)."""
    try:
        return integer(raw)
    except ValueError:
        raise BadReference(task, i, f"field {name!r} is {raw!r}, expected {expected}") from None


def _string_list(ref: Mapping, i: int, task: str, *names: str, empty: bool = False,
                 expected: str = "a non-empty list of strings") -> list[str]:
    """The first of `names` in reference row `i` as a list of strings, non-empty unless `empty`, read as the
    loaders read it (`fields.string_list`). `expected` says what the field should be."""
    raw = _field(ref, i, task, *names)
    name = next(n for n in names if ref.get(n) is not None)
    try:
        return string_list(raw, empty)
    except NotAString as problem:
        raise BadReference(task, i, f"field {name!r} {problem}, expected strings") from None
    except NotAStringList as problem:
        raise BadReference(task, i, f"field {name!r} {problem}, expected {expected}") from None


def _check_rule(task: str, scoring: str) -> None:
    rules = SCORING_RULES[task]
    if scoring not in rules:
        raise ValueError(f"task {task!r} has no scoring rule {scoring!r}; valid: {', '.join(rules)}")


# ---------------------------------------------------------------------------------------------------------
# TextVQA and VizWiz: VQA soft accuracy (`answer_normalization.vqa_soft_accuracy`)


def _textvqa_samples(preds: list[str], references: list[Mapping], scoring: str, task: str) -> dict[str, list]:
    """TextVQA VQA accuracy. Reference fields: ``answers`` (the 10 human answers).

    ``lmms-eval``: ``lmms_eval/tasks/textvqa/utils.py::textvqa_process_results`` (mean aggregation).
    ``llava``: ``llava/eval/eval_textvqa.py`` -> ``m4c_evaluator.TextVQAAccuracyEvaluator.eval_pred_list``.
    The two compute the same number: same normaliser, same 10-choose-9 average. The only difference is
    that m4c asserts exactly 10 human answers per question (so ``llava`` raises ValueError on another
    count), while lmms-eval averages over however many there are.
    """
    accs = []
    for i, (p, r) in enumerate(zip(preds, references)):
        gts = _string_list(r, i, "textvqa", "answers", "gt_answers")
        if scoring == LLAVA and len(gts) != 10:
            raise BadReference("textvqa", i, f"has {len(gts)} answers; the llava rule (m4c) needs 10")
        accs.append(vqa_soft_accuracy(p, gts))
    return {"accuracy": accs}


def _textvqa_aggregate(columns: Mapping[str, list], scoring: str) -> dict[str, float]:
    accs = columns["accuracy"]
    acc = sum(accs) / len(accs)
    return {"accuracy": acc, "score": 100.0 * acc, "n": float(len(accs))}


def _vizwiz_samples(preds: list[str], references: list[Mapping], scoring: str, task: str) -> dict[str, list]:
    """VizWiz-VQA (val) VQA accuracy. Reference fields: ``answers`` (10 strings, or VizWiz's
    ``{"answer": ...}`` dicts); optional ``answer_type`` / ``category`` for a per-type breakdown.

    Follows ``lmms_eval/tasks/vizwiz_vqa/utils.py::vizwiz_vqa_process_results``: the same EvalAI
    normalisation and 10-choose-9 accuracy as TextVQA, an empty answer list scoring 0. "Unanswerable" gets no
    special case in the scoring: lmms-eval's prompt asks the model to reply 'Unanswerable' when it cannot
    tell, the annotators' answers say "unanswerable", and the lowercasing normaliser makes the two match.
    ``unanswerable_ratio`` (extra) is the share of predictions that normalise to "unanswerable"; with an
    answer type per row, ``<type>/accuracy`` follows the official VizWiz breakdown (e.g.
    ``unanswerable/accuracy``). LLaVA has no local VizWiz scorer (``convert_vizwiz_for_submission.py`` only
    writes the EvalAI test-server upload), so there is no ``llava`` rule.
    """
    accs, unanswerable, kinds = [], [], []
    for i, (p, r) in enumerate(zip(preds, references)):
        # lmms-eval scores an empty list 0
        gts = _string_list(r, i, "vizwiz", "answers", empty=True, expected="a list of strings")
        accs.append(vqa_soft_accuracy(p, gts))
        unanswerable.append(normalize_vqa_answer(p) == "unanswerable")
        kind = r.get("answer_type", r.get("category"))
        kinds.append(kind if isinstance(kind, str) and kind else None)
    return {"accuracy": accs, "unanswerable": unanswerable, "kind": kinds}


def _vizwiz_aggregate(columns: Mapping[str, list], scoring: str) -> dict[str, float]:
    accs, by_type = columns["accuracy"], defaultdict(list)
    for a, kind in zip(accs, columns["kind"]):
        if kind is not None:
            by_type[kind].append(a)
    unanswerable = sum(columns["unanswerable"])
    acc = sum(accs) / len(accs)
    out = {"accuracy": acc, "score": 100.0 * acc, "n": float(len(accs)),
           "unanswerable_ratio": unanswerable / len(accs)}
    for kind, xs in sorted(by_type.items()):
        out[f"{kind}/accuracy"] = sum(xs) / len(xs)
    return out


# ---------------------------------------------------------------------------------------------------------
# GQA

_ASCII_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_gqa_answer(text: str, scoring: str = LMMS_EVAL) -> str:
    """GQA answer normalisation, per rule (applied to the prediction; see `_gqa_samples` for the gold side).

    ``lmms-eval``: ``gqa.yaml`` scores with the registered ``exact_match`` metric (``ignore_case: true``,
    ``ignore_punctuation: true``) after ``task.py`` strips the generation: strip, lowercase, delete every
    ASCII punctuation character (``string.punctuation``); inner whitespace is kept.
    ``llava``: ``scripts/convert_gqa_for_eval.py``: ``text.rstrip('.').lower()`` on the (already stripped)
    answer; GQA's ``eval.py`` then compares ``predicted == gold`` with no further change.
    """
    _check_rule("gqa", scoring)
    if scoring == LMMS_EVAL:
        return text.strip().lower().translate(_ASCII_PUNCT)
    if scoring == LLAVA:
        return text.strip().rstrip(".").lower()


def _gqa_samples(preds: list[str], references: list[Mapping], scoring: str, task: str) -> dict[str, list]:
    """GQA (testdev-balanced) exact-match accuracy. Reference field: ``answer``.

    ``lmms-eval``: both prediction and gold go through the same strip/lowercase/no-punctuation
    normalisation, then must be equal ("Yes!" and "t-shirt" vs "tshirt" match).
    ``llava``: prediction stripped, trailing periods removed, lowercased; the gold is compared as stored
    (GQA's golds are lowercase, unpunctuated words), so "Yes!" is wrong and "Yes..." is right.
    """
    hits = []
    for i, (p, r) in enumerate(zip(preds, references)):
        gold = _text_field(r, i, "gqa", "answer")
        # lmms-eval lowercases and de-punctuates the gold too (task.py strips only the generation).
        gold_n = gold.lower().translate(_ASCII_PUNCT) if scoring == LMMS_EVAL else gold
        hits.append(normalize_gqa_answer(p, scoring) == gold_n)
    return {"hit": hits}


def _gqa_aggregate(columns: Mapping[str, list], scoring: str) -> dict[str, float]:
    hits = columns["hit"]
    acc = sum(hits) / len(hits)
    return {"accuracy": acc, "score": 100.0 * acc, "n": float(len(hits))}


# ---------------------------------------------------------------------------------------------------------
# POPE

POPE_SPLITS = ("adversarial", "popular", "random")  # POPE's three files, coco_pope_<split>.json


def parse_pope_answer(text: str, scoring: str = LMMS_EVAL) -> str:
    """Map a POPE answer to "yes", "no" or (lmms-eval only) "other".

    ``lmms-eval`` (``lmms_eval/tasks/pope/utils.py::pope_process_results``): ``text.lower().strip()`` and
    nothing else; only exactly "yes" / "no" count, so "Yes." and "No, there is not." are "other".
    ``llava`` (``llava/eval/eval_pope.py::eval_pope``): keep the text before the first "." (if any), delete
    commas, split on single spaces; "no" if a word equals "No", "no" or "not", otherwise "yes". So "Yes."
    is yes, "No, there is not" is no, an empty answer and "Nope" are yes, and (case-sensitive) "NO" and
    "Not really" are yes too.
    """
    _check_rule("pope", scoring)
    if scoring == LMMS_EVAL:
        t = text.lower().strip()
        return t if t in ("yes", "no") else "other"
    if scoring == LLAVA:
        t = text.strip()
        if "." in t:
            t = t.split(".")[0]
        words = t.replace(",", "").split(" ")
        return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def _pope_block(parsed: list[str], gts: list[str]) -> dict[str, float]:
    n = len(parsed)
    tp = sum(p == "yes" and g == "yes" for p, g in zip(parsed, gts))
    fp = sum(p == "yes" and g == "no" for p, g in zip(parsed, gts))
    fn = sum(p == "no" and g == "yes" for p, g in zip(parsed, gts))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": sum(p == g for p, g in zip(parsed, gts)) / n,
        "precision": precision, "recall": recall, "f1": f1,
        "yes_ratio": parsed.count("yes") / n,
        "gt_yes_ratio": gts.count("yes") / n,
        "other_ratio": parsed.count("other") / n,
        "n": float(n),
    }


_POPE_KEYS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def _pope_samples(preds: list[str], references: list[Mapping], scoring: str, task: str) -> dict[str, list]:
    """POPE accuracy, precision, recall, F1 and yes-ratio, per split and overall.

    Reference fields: ``answer`` (or LLaVA's ``label``) "yes"/"no"; ``category`` (the split: adversarial,
    popular, random; rows without one go to split "all").

    Keys: ``<split>/<metric>`` for every split present, ``all/<metric>`` pooled over every row, and the
    headline ``accuracy``/``precision``/``recall``/``f1``/``yes_ratio`` plus ``score`` = 100 x ``f1``:

    * ``lmms-eval`` follows ``pope_aggregate_*``: accuracy counts "other" answers wrong; precision counts only
      answers that are exactly "yes" (TP: gold yes, FP: gold no) and recall only exact "yes"/"no" on gold-yes
      rows (TP vs FN), so "other" answers are left out of both; empty denominators give 0. Its ``pope`` task
      pools the three splits, so the headline is ``all/*``; per-split numbers equal its ``pope_adv`` /
      ``pope_pop`` / ``pope_random`` tasks.
    * ``llava`` follows ``eval_pope.py``: every answer is yes or no (see `parse_pope_answer`); metrics per
      category as it prints them; the headline is the mean over splits (how LLaVA-1.5 reports POPE). Where
      eval_pope divides by zero (no predicted or no gold "yes"), 0 is returned instead (deviation).

    ``yes_ratio`` is the share of answers read as "yes" (eval_pope's definition) under both rules.
    lmms-eval's own ``pope_yes_ratio`` counts the *gold* answers instead (its aggregate reads
    ``ground_truth``), so it is reported separately as ``gt_yes_ratio``; ``other_ratio`` is the share of
    answers that are neither (always 0 under ``llava``).
    """
    splits, parsed, golds = [], [], []
    for i, (p, r) in enumerate(zip(preds, references)):
        gold = _field(r, i, "pope", "answer", "label")
        g = str(gold).lower().strip()
        if g not in ("yes", "no"):
            raise BadReference("pope", i, f"answer is {gold!r}, expected 'yes' or 'no'")
        splits.append(_pope_split(r, i))
        parsed.append(parse_pope_answer(p, scoring))
        golds.append(g)
    named = [split for split in splits if split != "all"]
    if named and len(named) < len(splits):  # unnamed rows would pool as "all" and collide with the pooled keys
        raise BadReference("pope", splits.index("all"), f"has no category while others have one "
                                                        f"({named[0]!r}); give every row its category, or none")
    return {"split": splits, "parsed": parsed, "gold": golds}


def _pope_split(ref: Mapping, i: int) -> str:
    """Row i's split, "all" where it has none; a name that is no split (a typo, "randm") would silently be scored
    as a split of its own, so it is refused, as the loader refuses it."""
    split = ref.get("category")
    if _missing(split):
        return "all"
    if (problem := pope_split_problem(split)) is not None:
        raise BadReference("pope", i, f"field 'category' {problem}; expected {', '.join(POPE_SPLITS)}, or no category")
    return split


def pope_split_problem(category) -> str | None:
    """What is wrong with a POPE row's category (given), if anything: MME's rows have every field POPE's have, and
    its subtask names in 'category' tell them apart."""
    if category in POPE_SPLITS:
        return None
    return f"is {category!r}, not a POPE split" + (" (an MME subtask: these rows are MME's)"
                                                    if isinstance(category, str) and category in _MME_KIND else "")


def _pope_aggregate(columns: Mapping[str, list], scoring: str) -> dict[str, float]:
    by_split: dict[str, tuple[list[str], list[str]]] = {}
    all_p, all_g = [], []
    for split, parsed, g in zip(columns["split"], columns["parsed"], columns["gold"]):
        sp, sg = by_split.setdefault(split, ([], []))
        sp.append(parsed)
        sg.append(g)
        all_p.append(parsed)
        all_g.append(g)
    out: dict[str, float] = {}
    blocks = {s: _pope_block(*v) for s, v in sorted(by_split.items())}
    for s, b in blocks.items():
        for k, v in b.items():
            out[f"{s}/{k}"] = v
    pooled = _pope_block(all_p, all_g)
    for k, v in pooled.items():
        out[f"all/{k}"] = v
    if scoring == LMMS_EVAL:
        head = {k: pooled[k] for k in _POPE_KEYS}
    else:
        head = {k: sum(b[k] for b in blocks.values()) / len(blocks) for k in _POPE_KEYS}
    out.update(head)
    out["score"] = 100.0 * head["f1"]
    return out


# ---------------------------------------------------------------------------------------------------------
# MME

MME_SUBTASKS = {
    "perception": ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                   "artwork", "OCR"),
    "cognition": ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"),
}
_MME_KIND = {t: kind for kind, ts in MME_SUBTASKS.items() for t in ts}


def parse_mme_answer(text: str, scoring: str = LMMS_EVAL) -> str:
    """Map an MME answer to "yes", "no" or "other".

    ``lmms-eval`` (``lmms_eval/tasks/mme/utils.py::parse_pred_ans``, "brought from Otter"): lowercase, strip,
    delete every "."; exactly "yes"/"no" as is; a single character: "y" -> yes, "n" -> no, else other;
    otherwise look at the first 4 characters: "yes" in them -> yes, else "no" in them -> no, else other.
    ``llava`` (MME's ``eval_tool/calculation.py::calculate_metrics.parse_pred_ans``, run by LLaVA's
    ``scripts/v1_5/eval/mme.sh``): lowercase only; exactly "yes"/"no", else the same 4-character prefix
    test. It has no single-letter case, so "Y" and "N" are "other" (wrong) under ``llava`` but yes/no under
    ``lmms-eval``; it keeps periods, so "n." is other under ``llava``, no under ``lmms-eval``.
    """
    _check_rule("mme", scoring)
    if scoring == LMMS_EVAL:
        t = text.lower().strip().replace(".", "")
        if t in ("yes", "no"):
            return t
        if len(t) == 1:
            return {"y": "yes", "n": "no"}.get(t, "other")
    elif scoring == LLAVA:
        t = text.strip().lower()
        if t in ("yes", "no"):
            return t
    head = t[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def _mme_samples(preds: list[str], references: list[Mapping], scoring: str, task: str) -> dict[str, list]:
    """MME per-subtask acc and acc+, and the perception and cognition totals.

    Reference fields: ``answer`` ("Yes"/"No"), ``question_id`` (the image: MME asks two questions per image,
    e.g. ``"code_reasoning/0020.png"``), ``category`` (the subtask; taken from the question_id's first path
    part when absent, as LLaVA's ``convert_answer_to_mme.py`` does).

    Per subtask (``<subtask>/acc``, ``<subtask>/acc_plus``, ``<subtask>/score``): acc = share of questions
    right x100 ("other" answers are wrong), acc+ = share of images with both questions right x100, score =
    acc + acc+ (max 200). ``perception`` sums the 10 perception subtasks (max 2000), ``cognition`` the 4
    cognition ones (max 800), over the subtasks present; ``score`` = perception + cognition (the "MME"
    column of pruning papers; LLaVA-1.5 papers quote ``perception`` alone as "MME-P").

    Both rules aggregate the same way (lmms-eval's ``mme_aggregate_results`` and calculation.py's
    ``process_result``); they differ only in `parse_mme_answer`. Pairs are formed by (subtask, question_id)
    as lmms-eval does; calculation.py pairs consecutive lines of LLaVA's answer file, which holds the same
    pairs. A subtask outside MME's 14, or an image without exactly two questions, is a ValueError (lmms-eval
    asserts the pair; calculation.py asserts it too).
    """
    subtasks, image_ids, hits = [], [], []
    images: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))  # the references of each image
    for i, (p, r) in enumerate(zip(preds, references)):
        qid = _text_field(r, i, "mme", "question_id")
        cat = r.get("category")
        cat = qid.split("/")[0] if cat is None or cat == "" else cat
        if not isinstance(cat, str) or cat not in _MME_KIND:
            raise BadReference("mme", i, f"category {cat!r} is not an MME subtask; valid: "
                                         f"{', '.join(_MME_KIND)}")
        gold = _field(r, i, "mme", "answer")
        g = str(gold).lower().strip().replace(".", "")
        if g not in ("yes", "no"):
            raise BadReference("mme", i, f"answer is {gold!r}, expected 'Yes' or 'No'")
        subtasks.append(cat)
        image_ids.append(qid)
        hits.append(parse_mme_answer(p, scoring) == g)
        images[cat][qid].append(i)
    for cat in (c for kind in MME_SUBTASKS.values() for c in kind):
        for qid, rows in images.get(cat, {}).items():
            if len(rows) != 2:
                raise BadReference("mme", rows[0], f"is one of {len(rows)} questions on image {qid!r} ({cat}); MME "
                                                   "scores each image's pair of questions")
    return {"subtask": subtasks, "image": image_ids, "hit": hits}


def _mme_aggregate(columns: Mapping[str, list], scoring: str) -> dict[str, float]:
    images: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for cat, qid, hit in zip(columns["subtask"], columns["image"], columns["hit"]):
        images[cat][qid].append(float(hit))
    out: dict[str, float] = {}
    totals = {"perception": 0.0, "cognition": 0.0}
    for cat in (c for kind in MME_SUBTASKS.values() for c in kind):
        if cat not in images:
            continue
        per_image = images[cat]
        n_q = 2 * len(per_image)
        acc = 100.0 * sum(sum(h) for h in per_image.values()) / n_q
        acc_plus = 100.0 * sum(sum(h) == 2 for h in per_image.values()) / len(per_image)
        out[f"{cat}/acc"] = acc
        out[f"{cat}/acc_plus"] = acc_plus
        out[f"{cat}/score"] = acc + acc_plus
        totals[_MME_KIND[cat]] += acc + acc_plus
    out.update(totals)
    out["score"] = totals["perception"] + totals["cognition"]
    return out


# ---------------------------------------------------------------------------------------------------------
# MMBench (EN and CN), circular evaluation

_MMB_OPTIONS = "ABCD"
_MMB_INFER_TUPS = (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."), (":", ""),
                   (":", ","), (":", "."), (":", ")"), (":", ")."))


def _can_infer_option(answer: str, num_choice: int = 5):
    """``MMBench_Evaluator.can_infer_option``: a bare option letter (A-E) among the whitespace tokens."""
    choices = string.ascii_uppercase[:num_choice]
    if "Failed to obtain answer via API" in answer:
        return False
    splits = [x.strip() for x in answer.split()]

    def count(prefix: str = "", suffix: str = "") -> int:
        return sum(prefix + c + suffix in splits for c in choices)

    if count() == 1:
        for ch in choices:
            if "A" in splits and len(splits) > 3:
                break  # "A" may be the article ("A cat sits ..."): fall through to the marked forms
            if ch in splits:
                return ch
    for pre, suf in _MMB_INFER_TUPS:
        if count(pre, suf) == 1:
            for ch in choices:
                if pre + ch + suf in splits:
                    return ch
    return False


def _can_infer_text(answer: str, choices: Mapping[str, str]):
    """``MMBench_Evaluator.can_infer_text``: exactly one option's text is a substring of the answer."""
    a = answer.lower()
    cands = [k for k, v in choices.items() if str(v).lower() in a]
    return cands[0] if len(cands) == 1 else False


def _mmbench_choices(ref: Mapping) -> dict[str, str]:
    return {ch: ref[ch] for ch in _MMB_OPTIONS if ch in ref and listed_option(ref[ch])}


def extract_mmbench_option(prediction: str, options: Mapping[str, str]) -> str:
    """The option letter lmms-eval's static MMBench path reads from an answer ("" when none).

    ``MMBench_Evaluator.prefetch_answer`` -> ``can_infer``: a bare or marked letter among the answer's
    tokens ("B", "B.", "(B)", "B)", ":B" ...; a lone "A" in an answer of more than 3 tokens is taken for the
    article and skipped), else the one option whose text appears in the answer (case-insensitive); if neither
    decides, ``extract_mcq_answer`` over the options present (the ``mmbench_en_dev_static`` fallback that
    replaces the GPT matcher). The prefetch may return "E" (letters A-E are looked for), which then is
    simply a wrong answer.
    """
    pred = prediction.strip()
    choices = {k: v for k, v in options.items() if k in _MMB_OPTIONS and listed_option(v)}
    got = _can_infer_option(pred) or _can_infer_text(pred, choices)
    if got:
        return got
    return extract_mcq_answer(pred, sorted(choices))


def _mmbench_samples(preds: list[str], references: list[Mapping], scoring: str, task: str) -> dict[str, list]:
    """MMBench circular accuracy (EN and CN alike).

    Reference fields per row (the lmms-eval / official TSV layout): ``index``, ``answer`` (letter), the
    options ``A``..``D`` (blank ones None/NaN/"nan"), optional ``category`` and ``L2-category``. The circular
    copies of a question (the same question with its options rotated) are rows with ``index`` = original +
    k x 1,000,000, as in MMBench's dev/test files; a question is the set of rows sharing ``index % 1e6``.

    Follows ``lmms_eval/tasks/mmbench/mmbench_evals.py::MMBench_Evaluator.eval_result`` with
    ``eval_method="static"`` (task ``mmbench_en_dev_static``): a question counts right only if every one of
    its rows is answered with its own gold letter (`extract_mmbench_option`), one wrong or unreadable
    rotation makes the whole question wrong. ``accuracy`` is over questions; ``category/<c>`` and
    ``l2_category/<c>`` give the per-category hit rates lmms-eval prints; ``score`` = 100 x accuracy.

    Deliberate deviations: lmms-eval's default MMBench tasks send unreadable answers to a GPT matcher (and
    pick a random letter when it fails) and its CN tasks have no static path; here both languages use the
    static extractor, which needs no network and is deterministic. A question whose original (index < 1e6)
    row is missing is still scored from its rotations (lmms-eval would drop it). The options are those the
    prompt lists (`listed_option`): lmms-eval's scorer also takes a cell reading "nan" (how its results spell a
    missing option) for an option whose text is "nan", so there an answer containing "nan" ("banana") names two
    options and is unreadable; MMBench's own evaluation, on its TSV's empty cells, has no such option. LLaVA only
    writes the upload sheet for the MMBench server, so there is no ``llava`` rule.
    """
    questions, hits, rotated, cats = [], [], [], []
    for i, (p, r) in enumerate(zip(preds, references)):
        idx = _integer(_field(r, i, task, "index"), i, task, "index", "an integer")
        gold = str(_field(r, i, task, "answer")).strip()
        choices = _mmbench_choices(r)
        if gold not in choices:
            raise BadReference(task, i, f"answer {gold!r} is not one of its options {sorted(choices)}")
        questions.append(idx % 1_000_000)
        hits.append(extract_mmbench_option(p, choices) == gold)
        rotated.append(idx >= 1_000_000)
        cats.append((r.get("category"), r.get("L2-category", r.get("l2-category"))))
    return {"question": questions, "hit": hits, "rotated": rotated, "categories": cats}


def _mmbench_aggregate(columns: Mapping[str, list], scoring: str) -> dict[str, float]:
    groups: dict[int, list[bool]] = defaultdict(list)
    cats: dict[int, tuple[str | None, str | None]] = {}
    for key, hit, rotated, row_cats in zip(columns["question"], columns["hit"], columns["rotated"],
                                           columns["categories"]):
        groups[key].append(hit)
        if key not in cats or not rotated:
            cats[key] = row_cats
    hits = {k: all(v) for k, v in groups.items()}
    acc = sum(hits.values()) / len(hits)
    n_rows = len(columns["hit"])
    out = {"accuracy": acc, "score": 100.0 * acc, "n_questions": float(len(hits)), "n_rows": float(n_rows)}
    for pos, prefix in ((0, "category"), (1, "l2_category")):
        per: dict[str, list[bool]] = defaultdict(list)
        for k, h in hits.items():
            c = cats[k][pos]
            if isinstance(c, str) and c:
                per[c].append(h)
        for c, xs in sorted(per.items()):
            out[f"{prefix}/{c}"] = sum(xs) / len(xs)
    return out


# ---------------------------------------------------------------------------------------------------------
# ScienceQA-IMG

_SQA_LLAVA_OPTIONS = ("A", "B", "C", "D", "E")
_SQA_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def parse_scienceqa_option(prediction: str, n_choices: int, scoring: str = LMMS_EVAL) -> int:
    """The option index (0-based) a ScienceQA answer names, or -1.

    ``lmms-eval`` (``lmms_eval/tasks/scienceqa/utils.py::sqa_process_results``, "how llava parse it"): strip;
    the whole answer is the letter in any case ("b" counts), or it starts with an uppercase letter followed
    by "." ("B. the cat", "B."); nothing else ("(B)", "The answer is B.") is read.
    ``llava`` (``llava/eval/eval_science_qa.py``): the answer is exactly one of "A".."E" (uppercase), or
    starts with such a letter followed by ". " (so "B." alone is not read), or contains exactly one match of
    ``The answer is ([A-Z]).``; the letter then must be among the first ``n_choices`` options
    (``get_pred_idx``), else -1.
    """
    _check_rule("scienceqa_img", scoring)
    p = prediction.strip()
    if scoring == LMMS_EVAL:
        letters = [chr(ord("A") + k) for k in range(n_choices)]
        if p.upper() in letters and len(p) == 1:
            return letters.index(p.upper())
        if len(p) >= 2 and p[0].isupper() and p[1] == ".":
            return letters.index(p[0]) if p[0] in letters else -1
        return -1
    if scoring == LLAVA:
        if p in _SQA_LLAVA_OPTIONS:
            letter = p
        elif len(p) >= 3 and p[0] in _SQA_LLAVA_OPTIONS and p[1:3] == ". ":
            letter = p[0]
        else:
            found = _SQA_ANSWER_IS.findall(p)
            letter = found[0] if len(found) == 1 else "FAILED"
        valid = _SQA_LLAVA_OPTIONS[:n_choices]
        return valid.index(letter) if letter in valid else -1


def _scienceqa_samples(preds: list[str], references: list[Mapping], scoring: str, task: str) -> dict[str, list]:
    """ScienceQA-IMG option accuracy. Reference fields: ``choices`` (list of option texts) and ``answer``
    (the gold option's 0-based index, as in lmms-eval's ScienceQA-IMG and ScienceQA's problems.json; a
    letter is accepted too).

    Both rules: a prediction is right when `parse_scienceqa_option` reads the gold option from it. The
    rows given are the rows scored: ScienceQA-IMG is the image subset of the test split (eval_science_qa's
    "IMG-Accuracy"). ``unparsed_ratio`` is the share of answers from which no valid option was read.
    """
    hits, unparsed = [], []
    for i, (p, r) in enumerate(zip(preds, references)):
        n = len(_string_list(r, i, "scienceqa_img", "choices"))
        gold = _field(r, i, "scienceqa_img", "answer")
        if isinstance(gold, str) and len(gold.strip()) == 1 and gold.strip().isalpha():
            gold = ord(gold.strip().upper()) - ord("A")
        gold = _integer(gold, i, "scienceqa_img", "answer", "the gold option's 0-based index (or its letter)")
        if not 0 <= gold < n:
            raise BadReference("scienceqa_img", i, f"answer {gold} is outside its {n} choices")
        got = parse_scienceqa_option(p, n, scoring)
        hits.append(got == gold)
        unparsed.append(got == -1)
    return {"hit": hits, "unparsed": unparsed}


def _scienceqa_aggregate(columns: Mapping[str, list], scoring: str) -> dict[str, float]:
    n = len(columns["hit"])
    acc = sum(columns["hit"]) / n
    return {"accuracy": acc, "score": 100.0 * acc, "n": float(n), "unparsed_ratio": sum(columns["unparsed"]) / n}


# ---------------------------------------------------------------------------------------------------------
# OCRBench

OCRBENCH_CATEGORIES = {
    "text_recognition": ("Regular Text Recognition", "Irregular Text Recognition", "Artistic Text Recognition",
                         "Handwriting Recognition", "Digit String Recognition", "Non-Semantic Text Recognition"),
    "other": ("Scene Text-centric VQA", "Doc-oriented VQA", "Key Information Extraction",
              "Handwritten Mathematical Expression Recognition"),
}
_OCR_ALL = OCRBENCH_CATEGORIES["text_recognition"] + OCRBENCH_CATEGORIES["other"]


def _fold_fullwidth(text: str) -> str:
    return "".join(" " if c == "\u3000" else chr(ord(c) - 0xFEE0) if "\uff01" <= c <= "\uff5e" else c for c in text)


def ocrbench_match(prediction: str, answers, dataset: str) -> bool:
    """One OCRBench question: does any gold answer occur, as a substring, in the prediction?

    ``lmms_eval/tasks/ocrbench/utils.py::ocrbench_process_results`` (0.7.3; OCRBench's own example.py is the
    same rule without the fullwidth folding, which lmms-eval added):
    for the HME100k source (handwritten formulas) every space and newline is removed from both sides and
    case is kept; for every other source both sides have fullwidth ASCII folded to ASCII, are lowercased,
    stripped, and newlines become spaces. An empty gold answer matches anything (`_ocrbench_samples` refuses
    a reference with a blank answer).
    """
    golds = [answers] if isinstance(answers, str) else list(answers)
    pred = prediction.strip()
    if dataset == "HME100k":
        p = pred.replace("\n", " ").replace(" ", "")
        return any(str(a).strip().replace("\n", " ").replace(" ", "") in p for a in golds)
    p = _fold_fullwidth(pred).lower().strip().replace("\n", " ")
    return any(_fold_fullwidth(str(a)).lower().strip().replace("\n", " ") in p for a in golds)


def _ocrbench_samples(preds: list[str], references: list[Mapping], scoring: str, task: str) -> dict[str, list]:
    """OCRBench points. Reference fields: ``answer`` (string or list of accepted strings), ``dataset`` (the
    source, e.g. "HME100k", "IIIT5K"), ``question_type`` (one of the 10 OCRBench categories).

    ``ocrbench_aggregate_accuracy``: one point per matched question (`ocrbench_match`), summed per category;
    ``text_recognition`` sums the six recognition categories (300 in the full set), ``final_score`` all ten
    (1000 in the full set) and is the headline ``score``. ``accuracy`` = final_score / number of questions,
    which on the full set equals lmms-eval's returned ``Final_score / 1000`` (lmms-eval divides by 1000
    whatever the number of questions; here a subset gets its own share). Unlike lmms-eval's module-level
    counter, nothing carries over between calls. Only one rule: LLaVA has no OCRBench script.
    """
    qtypes, hits = [], []
    for i, (p, r) in enumerate(zip(preds, references)):
        qtype = _field(r, i, "ocrbench", "question_type")
        if qtype not in _OCR_ALL:
            raise BadReference("ocrbench", i, f"question_type {qtype!r} is not an OCRBench category; "
                                             f"valid: {', '.join(_OCR_ALL)}")
        answers = _field(r, i, "ocrbench", "answer", "answers")
        if not isinstance(answers, str):  # the loader's rule: one string, or a non-empty list of them
            answers = _string_list(r, i, "ocrbench", "answer", "answers",
                                   expected="a string or a non-empty list of strings")
        if any(not a.strip() for a in ([answers] if isinstance(answers, str) else answers)):
            raise BadReference("ocrbench", i, f"answer is {answers!r}: a blank answer matches every prediction "
                                              "(the official substring rule); give the accepted answer")
        dataset = _text_field(r, i, "ocrbench", "dataset")
        qtypes.append(qtype)
        hits.append(ocrbench_match(p, answers, dataset))
    return {"question_type": qtypes, "hit": hits}


def _ocrbench_aggregate(columns: Mapping[str, list], scoring: str) -> dict[str, float]:
    per = {c: 0 for c in _OCR_ALL}
    for qtype, hit in zip(columns["question_type"], columns["hit"]):
        per[qtype] += hit
    out: dict[str, float] = {c: float(v) for c, v in per.items()}
    out["text_recognition"] = float(sum(per[c] for c in OCRBENCH_CATEGORIES["text_recognition"]))
    out["final_score"] = float(sum(per.values()))
    out["accuracy"] = out["final_score"] / len(columns["hit"])
    out["score"] = out["final_score"]
    out["n"] = float(len(columns["hit"]))
    return out


# ---------------------------------------------------------------------------------------------------------
# Video-MME

VIDEOMME_DURATIONS = ("short", "medium", "long")


def _videomme_samples(preds: list[str], references: list[Mapping], scoring: str, task: str) -> dict[str, list]:
    """Video-MME accuracy. Reference fields: ``answer`` (the option letter A-D), ``duration`` (short, medium or
    long), ``domain``, ``task_type`` and ``videoID``.

    ``lmms_eval/tasks/videomme/utils.py`` (unchanged from v0.7.2 to commit 75571cf): ``videomme_process_results``
    reads the letter with `extract_mcq_answer` over A-D (empty when none) and ``videomme_aggregate_results`` returns
    100 x right / answered over every question (its per-duration, per-domain and per-task-type accuracies,
    which it only logs, are here ``<duration>/accuracy``, ``domain/<domain>`` and ``task/<task_type>``, in
    [0, 1]). ``score`` = the overall accuracy x100. Only one rule: LLaVA has no Video-MME script.
    """
    columns: dict[str, list] = {"hit": [], "duration": [], "domain": [], "task_type": [], "video": []}
    for i, (p, r) in enumerate(zip(preds, references)):
        gold = str(_field(r, i, "videomme", "answer")).strip()
        if gold not in ("A", "B", "C", "D"):
            raise BadReference("videomme", i, f"answer is {gold!r}, expected an option letter A-D")
        duration = _field(r, i, "videomme", "duration")
        if duration not in VIDEOMME_DURATIONS:
            raise BadReference("videomme", i, f"duration is {duration!r}, expected one of "
                                              f"{', '.join(VIDEOMME_DURATIONS)}")
        columns["hit"].append(extract_mcq_answer(p, choices=["A", "B", "C", "D"]) == gold)
        columns["duration"].append(duration)
        columns["domain"].append(str(r.get("domain")))
        columns["task_type"].append(str(r.get("task_type")))
        columns["video"].append(_text_field(r, i, "videomme", "videoID"))
    return columns


def _videomme_aggregate(columns: Mapping[str, list], scoring: str) -> dict[str, float]:
    hits = columns["hit"]
    out: dict[str, float] = {"accuracy": sum(hits) / len(hits)}
    for field, prefix in (("duration", ""), ("domain", "domain/"), ("task_type", "task/")):
        groups: dict[str, list[bool]] = defaultdict(list)
        for key, hit in zip(columns[field], hits):
            groups[key].append(hit)
        for key, group in sorted(groups.items()):
            out[f"{key}/accuracy" if field == "duration" else f"{prefix}{key}"] = sum(group) / len(group)
    out["score"] = 100.0 * out["accuracy"]
    return out


# ---------------------------------------------------------------------------------------------------------
# registry

# Each task's two stages: (preds, refs, scoring, task) -> per-sample columns, and (columns, scoring) -> result.
_STAGES: dict[str, tuple[Callable[..., dict[str, list]], Callable[..., dict[str, float]]]] = {
    "textvqa": (_textvqa_samples, _textvqa_aggregate),
    "vizwiz": (_vizwiz_samples, _vizwiz_aggregate),
    "gqa": (_gqa_samples, _gqa_aggregate),
    "pope": (_pope_samples, _pope_aggregate),
    "mme": (_mme_samples, _mme_aggregate),
    "mmbench_en": (_mmbench_samples, _mmbench_aggregate),
    "mmbench_cn": (_mmbench_samples, _mmbench_aggregate),
    "scienceqa_img": (_scienceqa_samples, _scienceqa_aggregate),
    "ocrbench": (_ocrbench_samples, _ocrbench_aggregate),
    "videomme": (_videomme_samples, _videomme_aggregate),
}

SCORING_RULES: dict[str, tuple[str, ...]] = {
    "textvqa": (LMMS_EVAL, LLAVA),
    "vizwiz": (LMMS_EVAL,),
    "gqa": (LMMS_EVAL, LLAVA),
    "pope": (LMMS_EVAL, LLAVA),
    "mme": (LMMS_EVAL, LLAVA),
    "mmbench_en": (LMMS_EVAL,),
    "mmbench_cn": (LMMS_EVAL,),
    "scienceqa_img": (LMMS_EVAL, LLAVA),
    "ocrbench": (LMMS_EVAL,),
    "videomme": (LMMS_EVAL,),
}

# Other spellings people use (lmms-eval task names among them) for the same benchmarks.
TASK_ALIASES = {
    "textvqa_val": "textvqa", "vizwiz_vqa": "vizwiz", "vizwiz_vqa_val": "vizwiz", "mmbench": "mmbench_en",
    "mmbench_en_dev": "mmbench_en", "mmbench_cn_dev": "mmbench_cn", "scienceqa": "scienceqa_img",
    "sqa": "scienceqa_img", "sqa_img": "scienceqa_img", "video_mme": "videomme",
}


def canonical_task(task: str) -> str:
    """`task`'s own name (lmms-eval's and other spellings in `TASK_ALIASES` accepted); ValueError if unknown."""
    t = TASK_ALIASES.get(task, task)
    if t not in SCORING_RULES:
        from ..methods.base import did_you_mean

        raise ValueError(f"unknown task {task!r}{did_you_mean(task, [*SCORING_RULES, *TASK_ALIASES])}; "
                         f"valid: {', '.join(SCORING_RULES)}")
    return t


def score(task: str, predictions, references, scoring: str = LMMS_EVAL) -> dict[str, float]:
    """Score `predictions` against `references` with `task`'s official metric under rule `scoring`.

    Raises ValueError for an unknown task or a rule the task does not have (both name the valid ones), and
    for malformed inputs (naming the row and field).
    """
    return score_outcomes(sample_outcomes(task, predictions, references, scoring))


@dataclass(frozen=True)
class Outcomes:
    """Every sample of one task judged once under one rule: what `score_outcomes` aggregates into `score`'s
    result, and what `vtprune.eval.intervals` resamples. ``columns`` holds one list per field, one entry per
    sample in input order (see `sample_outcomes`)."""

    task: str
    scoring: str
    columns: Mapping[str, list]

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))


def sample_outcomes(task: str, predictions, references, scoring: str = LMMS_EVAL) -> Outcomes:
    """Each answer parsed and judged by `task`'s rule, once; `score` == `score_outcomes` of this.

    Columns per task (one entry per sample): textvqa ``accuracy`` (VQA soft accuracy in [0, 1]); vizwiz
    ``accuracy``, ``unanswerable`` (bool), ``kind`` (answer type or None); gqa, scienceqa_img ``hit`` (bool;
    scienceqa_img also ``unparsed``); ocrbench ``hit``, ``question_type``; pope ``split``, ``parsed``
    ("yes"/"no"/"other"), ``gold`` ("yes"/"no"); mme ``subtask``, ``image`` (question_id), ``hit``;
    mmbench_en/cn ``question`` (index % 1e6), ``hit`` (this rotation right), ``rotated`` (index >= 1e6),
    ``categories`` ((category, L2-category)); videomme ``hit``, ``duration``, ``domain``, ``task_type``,
    ``video`` (videoID). Raises as `score` does.
    """
    t = canonical_task(task)
    _check_rule(t, scoring)
    preds, refs = _check_inputs(predictions, references, t)
    return Outcomes(t, scoring, _STAGES[t][0](preds, refs, scoring, t))


def score_outcomes(outcomes: Outcomes) -> dict[str, float]:
    """`score`'s result from samples already judged by `sample_outcomes`."""
    return _STAGES[outcomes.task][1](outcomes.columns, outcomes.scoring)


def _headline(v, bench: str, side: str) -> float:
    if isinstance(v, Mapping):
        if "score" not in v:
            raise ValueError(f"normalized_average: {side} result for {bench!r} has no 'score'")
        v = v["score"]
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ValueError(f"normalized_average: {side} score for {bench!r} is {v!r}, not a number") from None


def relative_scores(pruned: Mapping, unpruned: Mapping) -> dict[str, float]:
    """pruned / unpruned per benchmark. Values are numbers or result dicts (their ``score`` is used)."""
    if set(pruned) != set(unpruned):
        only_p = sorted(set(pruned) - set(unpruned))
        only_u = sorted(set(unpruned) - set(pruned))
        raise ValueError(f"normalized_average: benchmarks differ (only pruned: {only_p}, only unpruned: {only_u})")
    if not pruned:
        raise ValueError("normalized_average: no benchmarks")
    out = {}
    for b in pruned:
        base = _headline(unpruned[b], b, "unpruned")
        if base == 0:
            raise ValueError(f"normalized_average: unpruned score for {b!r} is 0; the ratio is undefined")
        out[b] = _headline(pruned[b], b, "pruned") / base
    return out


def normalized_average(pruned: Mapping, unpruned: Mapping) -> float:
    """Mean over benchmarks of pruned score / unpruned score (1.0 = no loss; papers print it x100 as "%").

    `pruned` and `unpruned` map benchmark name -> headline score, or -> a result dict from `score` (its
    ``score`` is used). Both must name the same benchmarks.
    """
    r = relative_scores(pruned, unpruned)
    return sum(r.values()) / len(r)
