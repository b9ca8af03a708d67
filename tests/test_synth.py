from collections import Counter, defaultdict

import numpy as np
import pytest

from vtprune.synth import ANSWERS, CLASSES, generate, make_sample, make_text, vocabulary, words
from vtprune.synth.generator import GAP, POPE_SPLITS, SIZE
from vtprune.synth.questions import derived_questions

N_STATS = 600  # samples per class for the statistical tests (text only, no rendering)


@pytest.fixture(scope="module")
def texts():
    """seed -> class -> samples without images."""
    return {seed: {c: [make_text(seed, i, c) for i in range(N_STATS)] for c in CLASSES}
            for seed in (1, 2)}


def test_determinism_and_seed_dependence():
    a, b = make_sample(7, 3), make_sample(7, 3)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert (a.question, a.answer, a.qclass) == (b.question, b.answer, b.qclass)
    assert a.qclass == CLASSES[3]
    assert make_sample(7, 3, CLASSES[3]).question == a.question
    c = make_sample(8, 3)
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))
    d = make_sample(7, 4)
    assert not np.array_equal(np.asarray(a.image), np.asarray(d.image))


def test_generate_round_robin_and_make_text_agree():
    samples = generate(5, 12)
    assert [s.qclass for s in samples] == list(CLASSES) * 2
    for i, s in enumerate(samples):
        t = make_text(5, i)
        assert (t.question, t.answer, t.meta["objects"]) == (s.question, s.answer, s.meta["objects"])
        assert s.image.size == (SIZE, SIZE) and s.image.mode == "RGB"
    sub = generate(5, 4, classes=("count", "ocr"))
    assert [s.qclass for s in sub] == ["count", "ocr", "count", "ocr"]


def test_words():
    assert words("How many red stars are there?") == ["how", "many", "red", "stars", "are", "there", "?"]
    assert words("is there a red star ?") == ["is", "there", "a", "red", "star", "?"]


def test_vocabulary_covers_everything(texts):
    vocab = set(vocabulary())
    assert all(w == w.lower() for w in vocab)
    for by_class in texts.values():
        for c, samples in by_class.items():
            for s in samples:
                assert set(words(s.question)) <= vocab, s.question
                assert len(words(s.answer)) == 1 and s.answer in vocab
                assert s.answer in ANSWERS[c]


def test_answers_balanced(texts):
    for c, samples in texts[1].items():
        counts = Counter(s.answer for s in samples)
        uniform = len(samples) / len(ANSWERS[c])
        assert set(counts) == set(ANSWERS[c]), c
        assert all(0.6 * uniform <= n <= 1.5 * uniform for n in counts.values()), (c, counts)
    pope = Counter((s.meta["pope"], s.answer) for s in texts[1]["existence"])
    assert len(pope) == 6 and min(pope.values()) >= 0.6 * N_STATS / 6, pope


def test_text_only_baseline_near_chance(texts):
    """Most frequent training answer per exact question string must not beat chance by much."""
    for c in CLASSES:
        by_q = defaultdict(Counter)
        for s in texts[1][c]:
            by_q[s.question][s.answer] += 1
        fallback = Counter(s.answer for s in texts[1][c]).most_common(1)[0][0]
        guess = {q: cnt.most_common(1)[0][0] for q, cnt in by_q.items()}
        acc = np.mean([guess.get(s.question, fallback) == s.answer for s in texts[2][c]])
        chance = 0.5 if c == "existence" else 1 / len(ANSWERS[c])
        assert acc <= chance + 0.15, (c, acc, chance)


def _centre(box):
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


SHAPE_OF = {"circles": "circle", "squares": "square", "triangles": "triangle", "stars": "star",
            "crosses": "cross", "diamonds": "diamond"}  # English plurals, written out by hand


def scene_answer(question: str, meta: dict):
    """(answer, sorted boxes of the objects the question asks about), read from the scene's objects and plates by
    the benchmark's rules alone; answer None where the scene does not answer the question unambiguously."""
    qw, objects, plates = words(question), meta["objects"], meta["plates"]
    objs = [(o["shape"], o["color"]) for o in objects]
    every = sorted(o["box"] for o in objects)
    boxes_of = lambda keep: sorted(o["box"] for o, so in zip(objects, objs) if keep(so))  # noqa: E731
    one = lambda found: found[0] if len(found) == 1 else None  # noqa: E731
    if qw[:2] == ["what", "word"]:
        found = [p for p in plates if p["color"] == qw[-3]]
        return one([p["word"] for p in found]), sorted(p["box"] for p in found)
    if qw[:2] == ["how", "many"]:
        target = (SHAPE_OF[qw[3]], qw[2])
        n = objs.count(target)
        return (str(n) if 1 <= n <= 5 else None), boxes_of(lambda o: o == target)
    if qw[:3] == ["what", "color", "is"]:
        return one([c for s, c in objs if s == qw[4]]), boxes_of(lambda o: o[0] == qw[4])
    if qw[:2] == ["what", "shape"]:  # a plate of that colour is a second "object" of it
        found = [s for s, c in objs if c == qw[4]] + [None for p in plates if p["color"] == qw[4]]
        return one(found), boxes_of(lambda o: o[1] == qw[4])
    if qw[0] == "where":
        a, b = (qw[4], qw[3]), (qw[9], qw[8])
        boxes = sorted(o["box"] for o, so in zip(objects, objs) if so in (a, b))
        if objs.count(a) != 1 or objs.count(b) != 1:
            return None, boxes
        (ax, ay), (bx, by) = (_centre(objects[objs.index(x)]["box"]) for x in (a, b))
        dx, dy = ax - bx, ay - by
        # >= 70 px along the asked axis and at most 0.4x that across it, give or take the pixel that
        # whole-pixel boxes round a centre by
        if abs(dx) >= 69 and abs(dy) <= 0.4 * abs(dx) + 1:
            return ("right" if dx > 0 else "left"), boxes
        if abs(dy) >= 69 and abs(dx) <= 0.4 * abs(dy) + 1:
            return ("below" if dy > 0 else "above"), boxes
        return None, boxes
    if qw[:2] == ["is", "there"]:
        query = (qw[4], qw[3])
        if query in objs:
            return "yes", boxes_of(lambda o: o == query)
        return "no", boxes_of(lambda o: o[0] == query[0] or o[1] == query[1])  # the near-misses
    if plates:  # a plate would count among "the objects", or not: no scene-wide question about it
        return None, every
    if qw[:3] == ["what", "color", "are"]:  # a clear plurality: >= 3, and >= 2 more than any other colour
        (top, n), *rest = Counter(c for _, c in objs).most_common() + [(None, 0)]
        return (top if n >= 3 and rest[0][1] <= n - 2 else None), every
    assert qw[:2] == ["which", "half"], question
    h = SIZE / 2  # every object 12 px clear of both midlines, and the half beats each other half by >= 2
    if not all((b[2] <= h - 12 or b[0] >= h + 12) and (b[3] <= h - 12 or b[1] >= h + 12) for b in every):
        return None, every
    cs = [_centre(b) for b in every]
    halves = {"left": sum(x < h for x, _ in cs), "right": sum(x > h for x, _ in cs),
              "top": sum(y < h for _, y in cs), "bottom": sum(y > h for _, y in cs)}
    best = max(halves, key=halves.get)
    return (best if all(halves[best] >= n + 2 for k, n in halves.items() if k != best) else None), every


def test_scenes_are_consistent_with_answers(texts):
    """Each sample's answer and relevant boxes (the grounding targets of training) are what its scene gives its
    question; the layout keeps its gaps and each POPE regime its distractors."""
    for c, samples in texts[1].items():
        for s in samples:
            boxes = [o["box"] for o in s.meta["objects"]] + [p["box"] for p in s.meta["plates"]]
            for i, a in enumerate(boxes):
                assert 0 <= min(a) and max(a) <= SIZE
                for b in boxes[i + 1:]:  # disjoint with a gap
                    assert (a[0] >= b[2] + GAP or b[0] >= a[2] + GAP
                            or a[1] >= b[3] + GAP or b[1] >= a[3] + GAP), (s.question, a, b)
            assert scene_answer(s.question, s.meta) == (s.answer, sorted(s.meta["relevant"])), s.question
            objs = [(o["shape"], o["color"]) for o in s.meta["objects"]]
            if c == "existence":
                shape, color = s.meta["query"]
                if s.meta["pope"] == "adversarial":
                    assert any(o[0] == shape and o[1] != color for o in objs)
                    assert any(o[1] == color and o[0] != shape for o in objs)
                if s.meta["pope"] == "popular":
                    shapes = Counter(o[0] for o in objs)
                    assert all(n < shapes[shape] for k, n in shapes.items() if k != shape)
            if c == "ocr":  # the other plate is a lure only if its word differs
                assert len({p["word"] for p in s.meta["plates"]}) == len(s.meta["plates"]) == 2


def test_existence_object_count_does_not_reveal_the_answer(texts):
    """A positive's queried object is one of its objects, not an extra one: else counting them would answer."""
    for pope in POPE_SPLITS:
        counts = {a: [len(s.meta["objects"]) for seed in texts for s in texts[seed]["existence"]
                      if (s.meta["pope"], s.answer) == (pope, a)] for a in ("yes", "no")}
        assert set(counts["yes"]) == set(counts["no"]) == set(range(3, 9)), pope
        assert abs(np.mean(counts["yes"]) - np.mean(counts["no"])) < 0.5, pope


def test_no_scene_repeats_across_seeds_or_indices():
    """Training (seed 0), validation, evaluation, test, calibration and results seeds (1-5): a scene two of them
    share is one the model is scored on after training on it."""
    for c in CLASSES:
        scenes = {(s.question, repr(s.meta["objects"]), repr(s.meta["plates"]))
                  for seed in range(6) for i in range(60) for s in [make_text(seed, i, c)]}
        assert len(scenes) == 6 * 60, c


def test_derived_questions_are_answered_by_the_scene():
    """Training's extra questions about a scene: each has the answer and boxes the scene gives it, and no more
    of them than asked for."""
    checked = Counter()
    for i in range(300):
        meta = make_text(1, i).meta
        derived = derived_questions(meta, np.random.default_rng(i), 1000)
        for question, answer, qclass, boxes in derived:
            assert scene_answer(question, meta) == (answer, sorted(boxes)), question
            checked[qclass] += 1
        assert len(derived_questions(meta, np.random.default_rng(i), 3)) == min(3, len(derived))
    assert min(checked[c] for c in CLASSES) >= 50, checked  # every kind of question was checked, many times
