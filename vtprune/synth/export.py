"""The synthetic VQA written out as a real benchmark's files, so that `vtprune eval --tasks` runs end to end on
the reference model, a model that really answers.

OCRBench's own layout (OCRBench/OCRBench.json + OCRBench_Images/) is the one whose lmms-eval prompt is the
bare question, which is what the reference model was trained on (GQA's and POPE's add a post-prompt of words
its vocabulary lacks). Its score counts a question right when the answer is in the generated text: run it
with `--max-new-tokens 1`, since the reference model answers in one word and was never taught to stop.
"""

from __future__ import annotations

import json
from pathlib import Path

from .generator import Sample

QUESTION_TYPE = "Scene Text-centric VQA"  # an OCRBench category scored by case-insensitive containment


def write_as_ocrbench(samples: list[Sample], folder: str | Path) -> Path:
    """OCRBench's question file and image folder under folder (what `vtprune.eval.loaders` reads as ocrbench)."""
    folder = Path(folder)
    (folder / "OCRBench").mkdir(parents=True, exist_ok=True)
    (folder / "OCRBench_Images" / "synthetic").mkdir(parents=True, exist_ok=True)
    entries = []
    for i, sample in enumerate(samples):
        image = f"synthetic/{i}.png"
        sample.image.save(folder / "OCRBench_Images" / image)
        entries.append({"dataset_name": f"synthetic-{sample.qclass}", "id": i, "image_path": image,
                        "question": sample.question, "answers": [sample.answer], "type": QUESTION_TYPE})
    (folder / "OCRBench" / "OCRBench.json").write_text(json.dumps(entries, indent=1))
    return folder
