"""More questions about an image the generator already made: training signal, not benchmark samples.

Each generated scene is built around one question, but its metadata (every object's
colour, shape and box, every plate's word) answers many others. Training on several
questions per image gives the model several answer targets for each image it pays to
encode. Every derived question uses a benchmark template and is only asked when the
scene answers it unambiguously, by the same rules the generator builds its scenes with.
"""

from __future__ import annotations

from collections import Counter
from itertools import permutations, zip_longest

import numpy as np

from .generator import COLOR_NAMES, PLURAL, SHAPES, SIZE, TEMPLATES

Question = tuple[str, str, str, tuple]  # question, answer, class, the boxes that answer it


def _centre(box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def _existence(objects, rng) -> list[Question]:
    present = {(o["shape"], o["color"]) for o in objects}
    # Negatives share a shape or a colour with something present (POPE's adversarial kind) when they can.
    near = [(s, c) for s in SHAPES for c in COLOR_NAMES if (s, c) not in present
            and any(s == ps or c == pc for ps, pc in present)]
    absent = near or [(s, c) for s in SHAPES for c in COLOR_NAMES if (s, c) not in present]
    out = []
    for pool, answer in ((sorted(present), "yes"), (absent, "no")):
        if pool:
            shape, color = pool[int(rng.integers(len(pool)))]
            # as the generator: the object for a yes, the near-misses for a no
            boxes = tuple(o["box"] for o in objects if (o["shape"], o["color"]) == (shape, color) if answer == "yes")
            boxes = boxes or tuple(o["box"] for o in objects if o["shape"] == shape or o["color"] == color)
            out.append((TEMPLATES["existence"].format(color=color, shape=shape), answer, "existence", boxes))
    return out


def _attribute(objects, plates) -> list[Question]:
    shapes = Counter(o["shape"] for o in objects)
    colors = Counter(o["color"] for o in objects) + Counter(p["color"] for p in plates)
    out = [(TEMPLATES["attr_color"].format(shape=o["shape"]), o["color"], "attribute", (o["box"],))
           for o in objects if shapes[o["shape"]] == 1]
    out += [(TEMPLATES["attr_shape"].format(color=o["color"]), o["shape"], "attribute", (o["box"],))
            for o in objects if colors[o["color"]] == 1]
    return out


def _count(objects) -> list[Question]:
    combos = Counter((o["shape"], o["color"]) for o in objects)
    return [(TEMPLATES["count"].format(color=color, shapes=PLURAL[shape]), str(n), "count",
             tuple(o["box"] for o in objects if (o["shape"], o["color"]) == (shape, color)))
            for (shape, color), n in combos.items() if 1 <= n <= 5]


def _spatial(objects) -> list[Question]:
    combos = Counter((o["shape"], o["color"]) for o in objects)
    unique = [o for o in objects if combos[(o["shape"], o["color"])] == 1]
    out = []
    for a, b in permutations(unique, 2):
        (ax, ay), (bx, by) = _centre(a["box"]), _centre(b["box"])
        dx, dy = ax - bx, ay - by
        # The generator's rule: >= 70 px along the asked axis, at most 0.4x that across it.
        if abs(dx) >= 70 and abs(dy) <= 0.4 * abs(dx):
            answer = "right" if dx > 0 else "left"
        elif abs(dy) >= 70 and abs(dx) <= 0.4 * abs(dy):
            answer = "below" if dy > 0 else "above"
        else:
            continue
        out.append((TEMPLATES["spatial"].format(shape=a["shape"], color=a["color"], shape2=b["shape"],
                                                color2=b["color"]), answer, "spatial", (a["box"], b["box"])))
    return out


def _general(objects, plates) -> list[Question]:
    if plates:
        return []
    out = []
    everything = tuple(o["box"] for o in objects)
    colors = Counter(o["color"] for o in objects).most_common()
    if colors and colors[0][1] >= 3 and all(n <= colors[0][1] - 2 for _, n in colors[1:]):
        out.append((TEMPLATES["gen_color"], colors[0][0], "general", everything))
    half, gap = SIZE / 2, 12  # every object clearly inside one quadrant, as the generator places them
    clear = all((b[2] <= half - gap or b[0] >= half + gap) and (b[3] <= half - gap or b[1] >= half + gap)
                for b in (o["box"] for o in objects))
    centres = [_centre(o["box"]) for o in objects]
    counts = {"left": sum(x < half for x, _ in centres), "right": sum(x >= half for x, _ in centres),
              "top": sum(y < half for _, y in centres), "bottom": sum(y >= half for _, y in centres)}
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    if clear and ranked[0][1] >= 4 and ranked[0][1] >= ranked[1][1] + 2:
        out.append((TEMPLATES["gen_side"], ranked[0][0], "general", everything))
    return out


def derived_questions(meta: dict, rng: np.random.Generator, limit: int) -> list[Question]:
    """Up to `limit` distinct questions that this scene answers unambiguously, classes taken in turn.

    Taking classes in turn keeps the many spatial pairs of a busy scene from crowding out the rest.
    """
    objects, plates = meta["objects"], meta["plates"]
    pool = (_existence(objects, rng) + _attribute(objects, plates) + _count(objects) + _spatial(objects)
            + _general(objects, plates)
            + [(TEMPLATES["ocr"].format(color=p["color"]), p["word"], "ocr", (p["box"],)) for p in plates])
    by_class: dict[str, list[Question]] = {}
    for item in dict.fromkeys(pool):
        by_class.setdefault(item[2], []).append(item)
    queues = [[group[i] for i in rng.permutation(len(group))] for group in by_class.values()]
    queues = [queues[i] for i in rng.permutation(len(queues))]
    taken = [q for turn in zip_longest(*queues) for q in turn if q is not None]
    return taken[:limit]
