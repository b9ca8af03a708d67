"""Answer normalisation that several official metrics share, with no benchmark's rule or reference format in
it: EvalAI's VQA answer normaliser and the VQA soft accuracy built on it (TextVQA, VizWiz), and lmms-eval's
static option-letter extractor for multiple-choice answers (MMBench). Like lmms-eval's ``_task_utils``, which
they follow, these are kept apart from the per-benchmark rules in `vtprune.eval.metrics` that call them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence


# ---------------------------------------------------------------------------------------------------------
# VQA answers: EvalAI's normaliser and soft accuracy

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
              "?", "!")
# The EvalAI pattern is "(?!<=\d)(\.)(?!\d)": its first group is a (mistyped) lookahead that never fails at a
# ".", so in effect it drops every period not followed by a digit ("3.5" keeps its point).
_PERIOD = re.compile(r"\.(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"(?<=\d),+(?=\d)")
# EvalAI passes re.UNICODE (== 32) where `count` goes, so at most 32 periods are removed per answer.
_PERIOD_MAX = int(re.UNICODE)


def normalize_vqa_answer(text: str) -> str:
    """The VQA answer normaliser of EvalAI, as both lmms-eval and LLaVA ship it.

    Follows ``EvalAIAnswerProcessor.__call__`` in lmms-eval's ``_task_utils/vqa_eval_metric.py`` and in
    LLaVA's ``llava/eval/m4c_evaluator.py`` (the two classes are identical, both taken from mmf):

    1. lowercase; delete every "," and "?"; "'s" becomes " 's"; strip; newlines/tabs become spaces;
    2. for each punctuation mark in the list ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``: delete it if the
       text has it next to a space (or has a digit,digit comma), else replace it with a space; then delete
       periods not followed by a digit (at most 32 of them: EvalAI's ``count=re.UNICODE`` quirk, kept);
    3. split on whitespace, number words zero..ten (and "none") become digits, articles a/an/the are
       dropped, contractions without apostrophe get it back ("dont" -> "don't"), join with single spaces.

    Deliberately the same quirks as EvalAI, e.g. "none" -> "0" and the "'s" split ("dog's" -> "dog 's").
    """
    t = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    t = t.replace("\n", " ").replace("\t", " ").strip()
    original = t
    digit_comma = _DIGIT_COMMA_DIGIT.search(original) is not None
    for p in _VQA_PUNCT:
        if (p + " " in original or " " + p in original) or digit_comma:
            t = t.replace(p, "")
        else:
            t = t.replace(p, " ")
    t = _PERIOD.sub("", t, count=_PERIOD_MAX)
    words = []
    for w in t.lower().split():
        w = _NUMBER_WORDS.get(w, w)
        if w not in _ARTICLES:
            words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def vqa_soft_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """VQA accuracy of one answer: min(#matching humans / 3, 1), averaged over the leave-one-out subsets.

    For 10 human answers this is the official "10 choose 9" average: for each of the 10 subsets of 9
    answers, min(matches among those 9 / 3, 1), then the mean. Prediction and human answers are both passed
    through `normalize_vqa_answer` first. Same computation as lmms-eval's ``textvqa_process_results`` /
    ``vizwiz_vqa_process_results`` (loop over i, other answers j != i) and LLaVA's
    ``TextVQAAccuracyEvaluator._compute_answer_scores`` (per unique answer, the same leave-one-out loop).
    An empty answer list scores 0 (lmms-eval's VizWiz branch).
    """
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in gt_answers]
    if not gts:
        return 0.0
    total = gts.count(pred)
    accs = [min(1.0, (total - (g == pred)) / 3.0) for g in gts]
    return sum(accs) / len(accs)


# ---------------------------------------------------------------------------------------------------------
# multiple-choice answers: the option letter an answer names

_MCQ_PHRASES = (
    "the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
    "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
    "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select",
    "i pick", "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは",
)
_MCQ_PRIORITY = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4,
                 "right_paren": 3, "space": 2, "fallback": 0}


def extract_mcq_answer(response: str, choices: Sequence[str] | None = None) -> str:
    """lmms-eval's static option-letter extractor (``_task_utils/mcq_extract.py::extract_mcq_answer``).

    Candidates in several forms, best first: the answer starts with a standalone letter (10), ends with one
    (9), a letter after an answer phrase such as "the answer is" / "答案是" (7), "(X)" (6), "X." (5), "X:" (4),
    "X)" (3), "X " (2); only when none is found, any occurrence of a letter (0). Ties go to the later
    position. Returns "" when nothing is found.
    """
    if not response or not response.strip():
        return ""
    letters = list(choices) if choices else list("ABCDEFGH")
    text = response.strip()
    for ch in (",", ".", "!", "?", ";", ":", "'", '"'):
        text = text.strip(ch)
    text = f" {text} "
    cands: list[tuple[str, int, str]] = []
    for fmt, pattern in (("parentheses", "({})"), ("period", "{}."), ("colon", "{}:"), ("right_paren", "{})"),
                         ("space", "{} ")):
        for ch in letters:
            s = pattern.format(ch)
            if s in text:
                cands.append((ch, text.rfind(s), fmt))
    low = text.lower()
    for phrase in _MCQ_PHRASES:
        at = low.find(phrase)
        if at != -1:
            after = at + len(phrase)
            for ch in letters:
                pos = text.find(ch, after)
                if pos != -1:
                    cands.append((ch, pos, "phrase"))
    core = text.strip()
    for ch in letters:
        if core.startswith(ch) and (len(core) == 1 or not core[1].isalpha()):
            cands.append((ch, 0, "start"))
    for ch in letters:
        if core.endswith(ch) and (len(core) == 1 or not core[-2].isalpha()):
            cands.append((ch, len(text) - 1, "end"))
    if not cands:
        for ch in letters:
            if ch in text:
                cands.append((ch, text.rfind(ch), "fallback"))
    if not cands:
        return ""
    cands.sort(key=lambda c: (_MCQ_PRIORITY[c[2]], c[1]), reverse=True)
    return cands[0][0]
