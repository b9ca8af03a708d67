from collections import Counter, defaultdict

import numpy as np
import pytest

from vtprune.synth import ANSWERS, CLASSES, generate, make_sample, make_text, vocabulary, words
from vtprune.synth.generator import GAP, SIZE

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


def test_scenes_are_consistent_with_answers(texts):
    for c, samples in texts[1].items():
        for s in samples:
            boxes = [o["box"] for o in s.meta["objects"]] + [p["box"] for p in s.meta["plates"]]
            for i, a in enumerate(boxes):
                assert 0 <= min(a) and max(a) <= SIZE
                for b in boxes[i + 1:]:  # disjoint with a gap
                    assert (a[0] >= b[2] + GAP or b[0] >= a[2] + GAP
                            or a[1] >= b[3] + GAP or b[1] >= a[3] + GAP), (s.question, a, b)
            objs = [(o["shape"], o["color"]) for o in s.meta["objects"]]
            qw = words(s.question)
            if c == "count":
                assert objs.count(s.meta["target"]) == int(s.answer)
            elif c == "existence":
                assert (s.meta["query"] in objs) == (s.answer == "yes")
                shape, color = s.meta["query"]
                if s.meta["pope"] == "adversarial":
                    assert any(o[0] == shape and o[1] != color for o in objs)
                    assert any(o[1] == color and o[0] != shape for o in objs)
                if s.meta["pope"] == "popular":
                    shapes = Counter(o[0] for o in objs)
                    assert all(n < shapes[shape] for k, n in shapes.items() if k != shape)
            elif s.meta["template"] == "attr_color":
                matches = [o for o in objs if o[0] == qw[4]]
                assert len(matches) == 1 and matches[0][1] == s.answer
            elif s.meta["template"] == "attr_shape":
                matches = [o for o in objs if o[1] == qw[4]]
                assert len(matches) == 1 and matches[0][0] == s.answer
            elif c == "spatial":
                a, b = (qw[4], qw[3]), (qw[9], qw[8])
                assert objs.count(a) == 1 and objs.count(b) == 1
                (ax, ay), (bx, by) = (_centre(s.meta["objects"][objs.index(x)]["box"]) for x in (a, b))
                dx, dy = ax - bx, ay - by
                expect = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("below" if dy > 0 else "above")
                assert expect == s.answer and max(abs(dx), abs(dy)) >= 60
            elif s.meta["template"] == "gen_color":
                top = Counter(o[1] for o in objs).most_common(2)
                assert top[0][0] == s.answer and top[0][1] >= top[1][1] + 2
            elif s.meta["template"] == "gen_side":
                cs = [_centre(o["box"]) for o in s.meta["objects"]]
                halves = {"left": sum(x < SIZE / 2 for x, _ in cs), "right": sum(x > SIZE / 2 for x, _ in cs),
                          "top": sum(y < SIZE / 2 for _, y in cs), "bottom": sum(y > SIZE / 2 for _, y in cs)}
                best = halves.pop(s.answer)
                assert all(best >= n + 2 for n in halves.values()), (s.answer, halves)
            elif c == "ocr":
                plate_color = qw[-3]
                [plate] = [p for p in s.meta["plates"] if p["color"] == plate_color]
                assert plate["word"] == s.answer
