"""Seeded generator of synthetic VQA samples for measuring visual-token pruning.

Every sample is a 336x336 image (a 24x24 grid of 14 px patches) with small objects
(28-42 px, i.e. 2x2 to 3x3 patches) on a textured, cluttered background, plus lure
objects that share a shape or a colour with the asked-about ones. Being "not
background" therefore does not make a patch relevant, and losing a few of the right
patches loses the answer.

For each sample the answer is drawn uniformly first, then the question's free slots
(independently of the answer), then an image consistent with both. So the question
text carries (almost) no information about the answer: a text-only model scores
near chance, which tests/test_synth.py checks.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SIZE = 336
MARGIN = 6  # keep objects off the border
GAP = 6  # minimum empty space between two objects
OBJ_MIN, OBJ_MAX = 28, 42

CLASSES = ("ocr", "count", "attribute", "spatial", "existence", "general")

# Saturated or extreme colours; backgrounds are desaturated mid-tones, so all of
# these stay distinct from each other and from the texture.
COLORS = {
    "red": (225, 25, 25),
    "green": (20, 165, 45),
    "blue": (30, 75, 240),
    "yellow": (255, 225, 0),
    "purple": (150, 35, 205),
    "orange": (255, 130, 0),
    "white": (252, 252, 252),
    "black": (12, 12, 12),
}
COLOR_NAMES = tuple(COLORS)
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
PLURAL = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}

# Three-letter words, none of them a colour, shape or another answer.
OCR_WORDS = ("cat", "dog", "sun", "box", "cup", "key", "pen", "map",
             "hat", "fox", "bus", "egg", "owl", "jar", "ink", "kit")
# plate colour -> ink colour, chosen for maximal contrast.
PLATES = {"white": "black", "black": "white", "yellow": "black", "red": "white", "blue": "white"}

SIDES = ("left", "right", "top", "bottom")
DIRECTIONS = ("left", "right", "above", "below")

ANSWERS: dict[str, tuple[str, ...]] = {
    "ocr": OCR_WORDS,
    "count": ("1", "2", "3", "4", "5"),
    "attribute": COLOR_NAMES + SHAPES,
    "spatial": DIRECTIONS,
    "existence": ("yes", "no"),
    "general": COLOR_NAMES + SIDES,
}

TEMPLATES = {
    "ocr": "what word is written on the {color} plate ?",
    "count": "how many {color} {shapes} are there ?",
    "attr_color": "what color is the {shape} ?",
    "attr_shape": "what shape is the {color} object ?",
    # One template for all four directions: separate left/right and above/below
    # templates would let the wording halve the answer set.
    "spatial": "where is the {color} {shape} relative to the {color2} {shape2} ?",
    "existence": "is there a {color} {shape} in the image ?",
    "gen_color": "what color are most of the objects ?",
    "gen_side": "which half of the image has the most objects ?",
}

POPE_SPLITS = ("random", "popular", "adversarial")


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    question: str
    answer: str
    qclass: str
    meta: dict = field(default_factory=dict)


def words(text: str) -> list[str]:
    """Lowercase word split; a trailing '?' becomes its own token."""
    text = text.lower().strip()
    if text.endswith("?"):
        text = text[:-1] + " ?"
    return text.split()


def vocabulary() -> list[str]:
    vocab = {w for t in TEMPLATES.values() for w in words(t) if not w.startswith("{")}
    vocab |= set(COLOR_NAMES) | set(SHAPES) | set(PLURAL.values())
    vocab |= {a for answers in ANSWERS.values() for a in answers}
    return sorted(vocab)


# ----------------------------------------------------------------------------- layout

def _free(box, boxes) -> bool:
    x0, y0, x1, y1 = box
    return all(x0 >= b[2] + GAP or x1 + GAP <= b[0] or y0 >= b[3] + GAP or y1 + GAP <= b[1]
               for b in boxes)


def _place(rng, boxes, w, h, region=(0, 0, SIZE, SIZE), tries=200):
    """Random box of size w x h inside region, not touching `boxes`; appended to them."""
    lo_x, lo_y = max(region[0], MARGIN), max(region[1], MARGIN)
    hi_x, hi_y = min(region[2], SIZE - MARGIN) - w, min(region[3], SIZE - MARGIN) - h
    if hi_x < lo_x or hi_y < lo_y:
        return None
    for _ in range(tries):
        x, y = int(rng.integers(lo_x, hi_x + 1)), int(rng.integers(lo_y, hi_y + 1))
        box = (x, y, x + w, y + h)
        if _free(box, boxes):
            boxes.append(box)
            return box
    return None


def _size(rng) -> int:
    return int(rng.integers(OBJ_MIN, OBJ_MAX + 1))


def _obj(shape, color, box) -> dict:
    return {"kind": "obj", "shape": shape, "color": color, "box": box}


def _place_objs(rng, items, boxes, combos, region=(0, 0, SIZE, SIZE)) -> bool:
    for shape, color in combos:
        s = _size(rng)
        box = _place(rng, boxes, s, s, region)
        if box is None:
            return False
        items.append(_obj(shape, color, box))
    return True


def _pick(rng, seq, exclude=()):
    choices = [x for x in seq if x not in exclude]
    return choices[int(rng.integers(len(choices)))]


def _lure(rng, shape, color):
    """An object sharing exactly one attribute with (shape, color)."""
    if rng.random() < 0.5:
        return shape, _pick(rng, COLOR_NAMES, (color,))
    return _pick(rng, SHAPES, (shape,)), color


def _scatter(rng, combos):
    items, boxes = [], []
    return items if _place_objs(rng, items, boxes, combos) else None


def _retry(rng, build, *args):
    # The answer and question are fixed before this; only the layout is redrawn.
    for _ in range(100):
        out = build(rng, *args)
        if out is not None:
            return out
    raise RuntimeError("layout failed 100 times")  # not reached with these sizes


# ----------------------------------------------------------------------------- classes

def _ocr(rng):
    answer = _pick(rng, OCR_WORDS)
    color = _pick(rng, PLATES)
    other_word = _pick(rng, OCR_WORDS, (answer,))
    other_color = _pick(rng, PLATES, (color,))
    n_clutter = int(rng.integers(2, 5))
    clutter = [(_pick(rng, SHAPES), _pick(rng, COLOR_NAMES)) for _ in range(n_clutter)]

    def build(rng):
        items, boxes = [], []
        for word, plate in ((answer, color), (other_word, other_color)):
            fsize = int(rng.integers(30, 37))
            l, t, r, b = _font(fsize).getbbox(word.upper())
            box = _place(rng, boxes, r - l + 14, b - t + 12)
            if box is None:
                return None
            items.append({"kind": "plate", "word": word, "color": plate, "box": box, "font": fsize})
        return items if _place_objs(rng, items, boxes, clutter) else None

    items = _retry(rng, build)
    q = TEMPLATES["ocr"].format(color=color)
    return q, answer, items, {"template": "ocr", "relevant": [items[0]["box"]]}


def _count(rng):
    k = int(rng.integers(1, 6))
    shape, color = _pick(rng, SHAPES), _pick(rng, COLOR_NAMES)
    n_lures = int(rng.integers(1, 5))
    lures = [_lure(rng, shape, color) if rng.random() < 0.8
             else (_pick(rng, SHAPES, (shape,)), _pick(rng, COLOR_NAMES, (color,)))
             for _ in range(n_lures)]
    combos = [(shape, color)] * k + lures
    items = _retry(rng, _scatter, combos)
    q = TEMPLATES["count"].format(color=color, shapes=PLURAL[shape])
    meta = {"template": "count", "target": (shape, color), "relevant": [it["box"] for it in items[:k]]}
    return q, str(k), items, meta


def _attribute(rng):
    # Drawing the answer over colours+shapes makes every answer equally frequent;
    # the question type then follows from the answer.
    answer = _pick(rng, ANSWERS["attribute"])
    n_other = int(rng.integers(2, 7))
    if answer in COLORS:
        shape, color = _pick(rng, SHAPES), answer
        q = TEMPLATES["attr_color"].format(shape=shape)
        # the asked shape is unique; colours (including the answer's) repeat freely
        others = [(_pick(rng, SHAPES, (shape,)), _pick(rng, COLOR_NAMES)) for _ in range(n_other)]
    else:
        shape, color = answer, _pick(rng, COLOR_NAMES)
        q = TEMPLATES["attr_shape"].format(color=color)
        others = [(_pick(rng, SHAPES), _pick(rng, COLOR_NAMES, (color,))) for _ in range(n_other)]
    items = _retry(rng, _scatter, [(shape, color)] + others)
    meta = {"template": "attr_color" if answer in COLORS else "attr_shape",
            "relevant": [items[0]["box"]]}
    return q, answer, items, meta


def _spatial(rng):
    answer = _pick(rng, DIRECTIONS)
    a = (_pick(rng, SHAPES), _pick(rng, COLOR_NAMES))
    b = _pick(rng, [(s, c) for s in SHAPES for c in COLOR_NAMES], (a,))
    # lures share one attribute with a or b, so binding colour to shape matters
    lures = []
    for _ in range(int(rng.integers(2, 6))):
        ref = a if rng.random() < 0.5 else b
        lure = _lure(rng, *ref)
        if lure not in (a, b):
            lures.append(lure)
    axis, sign = {"left": (0, -1), "right": (0, 1), "above": (1, -1), "below": (1, 1)}[answer]

    def build(rng):
        boxes = []
        sb, sa = _size(rng), _size(rng)
        box_b = _place(rng, boxes, sb, sb)
        # Unambiguous: centres >= 70 px apart along the asked axis, and the offset
        # on the other axis at most 0.4x that (so the relation is clearly that one).
        main = rng.uniform(70, 230)
        off = [0.0, 0.0]
        off[axis] = sign * main
        off[1 - axis] = rng.uniform(-0.4, 0.4) * main
        cx = (box_b[0] + box_b[2]) / 2 + off[0] - sa / 2
        cy = (box_b[1] + box_b[3]) / 2 + off[1] - sa / 2
        box_a = (int(cx), int(cy), int(cx) + sa, int(cy) + sa)
        inside = MARGIN <= box_a[0] and MARGIN <= box_a[1] and max(box_a[2:]) <= SIZE - MARGIN
        if not (inside and _free(box_a, boxes)):
            return None
        boxes.append(box_a)
        items = [_obj(*a, box_a), _obj(*b, box_b)]
        return items if _place_objs(rng, items, boxes, lures) else None

    items = _retry(rng, build)
    q = TEMPLATES["spatial"].format(shape=a[0], color=a[1], shape2=b[0], color2=b[1])
    return q, answer, items, {"template": "spatial", "relevant": [items[0]["box"], items[1]["box"]]}


def _existence(rng):
    """POPE-style probe; meta["pope"] names the distractor regime:

    random      -- the other objects are arbitrary (just never the queried combination);
    popular     -- the queried shape is the scene's most frequent one (>= 2 copies in
                   other colours), the image analogue of POPE's "frequent object" negatives;
    adversarial -- the queried shape is present in another colour AND the queried
                   colour on another shape, so only the binding tells them apart.

    Positives get the same regimes (and the same object-count distribution), so each
    split is a balanced yes/no set and neither regime nor clutter reveals the answer.
    """
    answer = _pick(rng, ("yes", "no"))
    pope = _pick(rng, POPE_SPLITS)
    shape, color = _pick(rng, SHAPES), _pick(rng, COLOR_NAMES)
    n_total = int(rng.integers(3, 9))
    n_fill = n_total - (answer == "yes")
    if pope == "popular":
        copies = 2 if n_total < 7 else 3
        others = [c for c in COLOR_NAMES if c != color]
        forced = [(shape, str(c)) for c in rng.permutation(others)[:copies]]
        # every other shape at most once, so the queried shape is strictly the most frequent
        fill_shapes = [str(s) for s in rng.permutation([s for s in SHAPES if s != shape])]
    else:
        if pope == "adversarial":
            forced = [(shape, _pick(rng, COLOR_NAMES, (color,))), (_pick(rng, SHAPES, (shape,)), color)]
        else:
            forced = []
        fill_shapes = [_pick(rng, SHAPES) for _ in range(n_fill)]
    fillers = [(s, _pick(rng, COLOR_NAMES)) for s in fill_shapes[:n_fill - len(forced)]]
    fillers = [f if f != (shape, color) else (f[0], _pick(rng, COLOR_NAMES, (color,))) for f in fillers]
    combos = ([(shape, color)] if answer == "yes" else []) + forced + fillers
    items = _retry(rng, _scatter, combos)
    q = TEMPLATES["existence"].format(color=color, shape=shape)
    # for a "no" the evidence is the set of near-misses (empty for some "random" ones)
    relevant = [it["box"] for it in items if it["shape"] == shape or it["color"] == color]
    if answer == "yes":
        relevant = [items[0]["box"]]
    meta = {"template": "existence", "pope": pope, "query": (shape, color), "relevant": relevant}
    return q, answer, items, meta


# (majority, minority) counts for the side question; with the balanced split below,
# the majority half beats each perpendicular half by >= 2 objects.
_SIDE_SPLITS = ((4, 0), (5, 0), (5, 1), (6, 0), (6, 1), (6, 2), (7, 1))


def _general(rng):
    answer = _pick(rng, ANSWERS["general"])
    if answer in COLORS:
        k = int(rng.integers(3, 5))
        others = []
        for _ in range(int(rng.integers(2, 5))):
            # a clear plurality: every other colour appears at most k - 2 times
            full = {c for _, c in others if sum(o[1] == c for o in others) >= k - 2}
            others.append((_pick(rng, SHAPES), _pick(rng, COLOR_NAMES, full | {answer})))
        combos = [(_pick(rng, SHAPES), answer) for _ in range(k)] + others
        build = lambda rng: _scatter(rng, combos)  # noqa: E731
        template = "gen_color"
    else:
        major, minor = _SIDE_SPLITS[int(rng.integers(len(_SIDE_SPLITS)))]
        combos = [(_pick(rng, SHAPES), _pick(rng, COLOR_NAMES)) for _ in range(major + minor)]
        horizontal = answer in ("left", "right")
        big = 0 if answer in ("left", "top") else 1  # index of the majority half

        def quad_region(col, row):
            # objects keep 12 px off both midlines, so each one is clearly in one quadrant
            h, g = SIZE // 2, 12
            return (0 if col == 0 else h + g, 0 if row == 0 else h + g,
                    h - g if col == 0 else SIZE, h - g if row == 0 else SIZE)

        def build(rng):
            # Alternate over the perpendicular halves, the minority half starting on the
            # side the majority left short, so that split stays as even as possible.
            lo = int(rng.integers(2))
            items, boxes = [], []
            halves = [big] * major + [1 - big] * minor
            for i, (combo, half) in enumerate(zip(combos, halves)):
                perp = (i + lo) % 2 if half == big else (i - major + lo + 1) % 2
                col, row = (half, perp) if horizontal else (perp, half)
                if not _place_objs(rng, items, boxes, [combo], quad_region(col, row)):
                    return None
            return items

        template = "gen_side"
    items = _retry(rng, build)
    return TEMPLATES[template], answer, items, {"template": template,
                                                "relevant": [it["box"] for it in items]}


_BUILDERS = {"ocr": _ocr, "count": _count, "attribute": _attribute, "spatial": _spatial,
             "existence": _existence, "general": _general}


# ----------------------------------------------------------------------------- rendering

@lru_cache(maxsize=None)
def _font(size: int):
    return ImageFont.load_default(size=size)


_AXIS = np.arange(SIZE, dtype=np.float32)


def _background(rng) -> Image.Image:
    # Desaturated mid-tone so white, black and the saturated object colours all stand out.
    base = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.05, 0.3),
                                        rng.uniform(0.45, 0.68)), dtype=np.float32) * 255
    # Smooth blobs and a slight tint drift: a coarse random grid, bicubically enlarged.
    grid = int(rng.integers(3, 9))
    coarse = (base + rng.uniform(-1, 1, (grid, grid, 1)) * rng.uniform(10, 25)
              + rng.uniform(-6, 6, (grid, grid, 3)))
    smooth = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8), "RGB")
    img = np.asarray(smooth.resize((SIZE, SIZE), Image.BICUBIC)).astype(np.int16)
    # High-frequency luminance detail on top: grain, stripes, checkerboard patches.
    lum = rng.integers(-7, 8, (SIZE, SIZE), dtype=np.int16)
    kind = int(rng.integers(4))
    if kind in (1, 3):  # stripes at a random angle; sin(u + v) split so it stays two outer products
        ang, period, amp = rng.uniform(0, np.pi), rng.uniform(6, 22), rng.uniform(5, 12)
        u, v = _AXIS * (np.cos(ang) * 2 * np.pi / period), _AXIS * (np.sin(ang) * 2 * np.pi / period)
        lum += (amp * (np.outer(np.cos(v), np.sin(u)) + np.outer(np.sin(v), np.cos(u)))).astype(np.int16)
    if kind in (2, 3):
        for _ in range(int(rng.integers(2, 6))):
            x0, y0 = (int(t) for t in rng.integers(0, SIZE - 40, 2))
            w, h = (int(t) for t in rng.integers(40, 140, 2))
            cell, amp = int(rng.integers(4, 13)), int(rng.integers(6, 15))
            xs, ys = np.arange(x0, min(x0 + w, SIZE)) // cell, np.arange(y0, min(y0 + h, SIZE)) // cell
            lum[y0:y0 + h, x0:x0 + w] += ((np.add.outer(ys, xs) % 2 * 2 - 1) * amp).astype(np.int16)
    img += lum[..., None]
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    # Clutter: thin low-contrast strokes and specks in background-like tones.
    draw = ImageDraw.Draw(out)
    for _ in range(int(rng.integers(8, 25))):
        tone = tuple(int(v) for v in np.clip(base + rng.normal(0, 28, 3) + rng.uniform(-30, 30), 0, 255))
        x, y = rng.integers(0, SIZE, 2)
        if rng.random() < 0.6:
            dx, dy = rng.integers(-40, 41, 2)
            draw.line([(int(x), int(y)), (int(x + dx), int(y + dy))], fill=tone, width=int(rng.integers(1, 3)))
        else:
            r = int(rng.integers(2, 6))
            draw.ellipse([int(x) - r, int(y) - r, int(x) + r, int(y) + r], fill=tone)
    return out


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, fill) -> None:
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
    elif shape == "square":
        d = r * 0.1  # slightly inset so its area is close to the circle's
        draw.rectangle([x0 + d, y0 + d, x1 - 1 - d, y1 - 1 - d], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1 - 1, cy), (cx, y1 - 1), (x0, cy)], fill=fill)
    elif shape == "cross":
        t = r * 0.36
        draw.rectangle([cx - t, y0, cx + t, y1 - 1], fill=fill)
        draw.rectangle([x0, cy - t, x1 - 1, cy + t], fill=fill)
    elif shape == "star":
        ang = -np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        draw.polygon([(cx + q * np.cos(a), cy + 0.08 * r + q * np.sin(a)) for a, q in zip(ang, rad)],
                     fill=fill)
    else:
        raise ValueError(shape)


def _render(rng, items) -> Image.Image:
    img = _background(rng)
    draw = ImageDraw.Draw(img)
    for it in items:
        if it["kind"] == "obj":
            _draw_shape(draw, it["shape"], it["box"], COLORS[it["color"]])
        else:
            x0, y0, x1, y1 = it["box"]
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=COLORS[it["color"]])
            font = _font(it["font"])
            l, t, _, _ = font.getbbox(it["word"].upper())
            draw.text((x0 + 7 - l, y0 + 6 - t), it["word"].upper(), font=font,
                      fill=COLORS[PLATES[it["color"]]])
    return img


# ----------------------------------------------------------------------------- public API

def _scene(seed: int, index: int, qclass: str | None):
    qclass = CLASSES[index % len(CLASSES)] if qclass is None else qclass
    rng = np.random.default_rng([seed, index, CLASSES.index(qclass)])
    question, answer, items, meta = _BUILDERS[qclass](rng)
    meta["objects"] = [{k: v for k, v in it.items() if k != "kind"} for it in items if it["kind"] == "obj"]
    meta["plates"] = [{k: v for k, v in it.items() if k != "kind"} for it in items if it["kind"] == "plate"]
    return rng, items, Sample(image=None, question=question, answer=answer, qclass=qclass, meta=meta)


def make_sample(seed: int, index: int, qclass: str | None = None) -> Sample:
    rng, items, sample = _scene(seed, index, qclass)
    # rendering draws from the same rng only after the scene is fixed
    return replace(sample, image=_render(rng, items))


def make_text(seed: int, index: int, qclass: str | None = None) -> Sample:
    """make_sample without the image (image=None), ~50x faster: for answer statistics."""
    return _scene(seed, index, qclass)[2]


def generate(seed: int, n: int, classes=CLASSES) -> list[Sample]:
    classes = tuple(classes)
    return [make_sample(seed, i, classes[i % len(classes)]) for i in range(n)]
