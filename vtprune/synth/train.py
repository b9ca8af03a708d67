"""`vtprune train-reference`: train the reference model from scratch on generated samples.

Three losses: cross-entropy on the one-word answer; a caption after the answer
(every object's colour and shape, and each plate's word, in reading order), the
analogue of LLaVA's caption pre-training, which teaches the LM to read its visual
tokens; and an auxiliary dense loss that asks every visual token (the vision tower's
output that the projector reads) for the colour, shape and word under its patch,
from the generator's object boxes. The two auxiliary losses are what let a model
trained from scratch on two CPU cores learn in tens of thousands of samples; the
dense head is not part of the saved model. Evaluation prompts end at "ASSISTANT:",
so the answer is the first word generated.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .generator import COLOR_NAMES, OCR_WORDS, SHAPES, make_sample
from .reference import (
    GRID,
    IMAGE_TOKEN,
    PATCH,
    TRAIN_SEED,
    VALIDATION_SEED,
    build_model,
    build_processor,
    build_tokenizer,
    pixel_values,
    prompt,
)

PLATE_SHAPE = len(SHAPES) + 1  # plates are a "shape" of their own in the dense labels


def patch_labels(meta: dict) -> np.ndarray:
    """[3, 24, 24] labels per patch: colour, shape, word (0 = none), from the boxes covering each patch centre."""
    labels = np.zeros((3, GRID, GRID), dtype=np.int64)
    centres = np.arange(GRID) * PATCH + PATCH / 2
    for item in meta["objects"] + meta["plates"]:
        x0, y0, x1, y1 = item["box"]
        rows = (centres >= y0) & (centres <= y1)
        cols = (centres >= x0) & (centres <= x1)
        cover = rows[:, None] & cols[None, :]
        labels[0][cover] = COLOR_NAMES.index(item["color"]) + 1
        labels[1][cover] = SHAPES.index(item["shape"]) + 1 if "shape" in item else PLATE_SHAPE
        if "word" in item:
            labels[2][cover] = OCR_WORDS.index(item["word"]) + 1
    return labels


def caption(meta: dict) -> str:
    """Every object and plate in reading order (four bands top to bottom, left to right in each)."""
    items = meta["objects"] + meta["plates"]
    items = sorted(items, key=lambda it: ((it["box"][1] + it["box"][3]) // 168, it["box"][0] + it["box"][2]))
    return " ".join(f"{it['color']} plate {it['word']}" if "word" in it else f"{it['color']} {it['shape']}" for it in items)


def encode(tokenizer, questions: list[str], answers: list[str] | None = None, captions: list[str] | None = None):
    """Left-padded prompts (as the processor expands them); for training, the answer word and a caption follow.

    Returns input_ids, attention_mask and, with answers, the targets of the answer
    position and of the caption positions ([B, L], -100 elsewhere, aligned with input_ids).
    """
    expanded = [prompt(q).replace(IMAGE_TOKEN, IMAGE_TOKEN * GRID * GRID) for q in questions]
    rows = [tokenizer(text)["input_ids"] for text in expanded]
    prompt_lengths = [len(row) for row in rows]
    if answers is not None:
        rows = [row + tokenizer(answer)["input_ids"] for row, answer in zip(rows, answers)]
    if captions is not None:
        rows = [row + tokenizer(text)["input_ids"] for row, text in zip(rows, captions)]
    length = max(map(len, rows))
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    answer_targets = torch.full_like(input_ids, -100)
    caption_targets = torch.full_like(input_ids, -100)
    for b, row in enumerate(rows):
        start = length - len(row)
        input_ids[b, start:] = torch.tensor(row)
        mask[b, start:] = 1
        if answers is not None:
            answer_at = start + prompt_lengths[b]
            answer_targets[b, answer_at] = input_ids[b, answer_at]
            caption_targets[b, answer_at + 1 :] = input_ids[b, answer_at + 1 :]
    if answers is None:
        return input_ids, mask
    return input_ids, mask, answer_targets, caption_targets


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of position t's logits against targets[t + 1]."""
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets[:, 1:].flatten(), ignore_index=-100)


class DenseHead(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.color = nn.Linear(width, len(COLOR_NAMES) + 1)
        self.shape = nn.Linear(width, PLATE_SHAPE + 1)
        self.word = nn.Linear(width, len(OCR_WORDS) + 1)

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.flatten(2)  # [B, 3, 576]
        # Normalized first, so that this loss cannot grow the scale of the features the projector reads.
        features = nn.functional.layer_norm(features, features.shape[-1:])
        return sum(
            nn.functional.cross_entropy(head(features).transpose(1, 2), labels[:, i])
            for i, head in enumerate((self.color, self.shape, self.word))
        )


@torch.no_grad()
def answer_accuracy(model, tokenizer, samples, batch_size: int = 32) -> dict[str, float]:
    """Greedy one-word answers against the truth, per class and overall."""
    model.eval()
    hits: dict[str, list[bool]] = {}
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        input_ids, mask = encode(tokenizer, [s.question for s in chunk])
        logits = model(input_ids=input_ids, attention_mask=mask, pixel_values=pixel_values([s.image for s in chunk]),
                       logits_to_keep=1).logits[:, -1]
        for sample, token in zip(chunk, logits.argmax(-1).tolist()):
            hits.setdefault(sample.qclass, []).append(tokenizer.convert_ids_to_tokens(token) == sample.answer)
    model.train()
    result = {c: float(np.mean(v)) for c, v in sorted(hits.items())}
    result["overall"] = float(np.mean([h for v in hits.values() for h in v]))
    return result


def train(
    out: Path,
    steps: int = 2400,
    batch_size: int = 32,
    lr: float = 2e-3,
    warmup: int = 100,
    dense_weight: float = 0.5,
    caption_weight: float = 0.5,
    eval_every: int = 200,
    eval_samples: int = 240,
    seed: int = 0,
) -> dict:
    """Train (resuming from out/ if a checkpoint is there); returns the last validation accuracy."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    model = build_model(tokenizer, seed=seed)
    head = DenseHead(model.config.vision_config.hidden_size)
    params = list(model.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    )
    state_path = out / "training_state.pt"
    start = 0
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start = state["step"]

    features = {}
    model.model.vision_tower.encoder.register_forward_hook(
        lambda module, args, output: features.__setitem__("last", output.last_hidden_state)
    )
    validation = [make_sample(VALIDATION_SEED, i) for i in range(eval_samples)]
    log = (out / "train_log.jsonl").open("a")
    model.train()
    began = time.time()
    accuracy = {}
    progress = tqdm(range(start, steps), initial=start, total=steps, desc="train-reference")
    for step in progress:
        samples = [make_sample(TRAIN_SEED, step * batch_size + i) for i in range(batch_size)]
        input_ids, mask, answer_targets, caption_targets = encode(
            tokenizer, [s.question for s in samples], [s.answer for s in samples], [caption(s.meta) for s in samples])
        dense = torch.from_numpy(np.stack([patch_labels(s.meta) for s in samples]))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=input_ids, attention_mask=mask, pixel_values=pixel_values([s.image for s in samples])).logits
            answer_loss = next_token_loss(logits, answer_targets)
            caption_loss = next_token_loss(logits, caption_targets)
            dense_loss = head.loss(features["last"][:, 1:].float(), dense)
        loss = answer_loss + caption_weight * caption_loss + dense_weight * dense_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        record = {"step": step + 1, "answer_loss": answer_loss.item(), "caption_loss": caption_loss.item(),
                  "dense_loss": dense_loss.item(),
                  "lr": schedule.get_last_lr()[0], "elapsed_s": round(time.time() - began, 1)}
        progress.set_postfix(answer=f"{record['answer_loss']:.3f}", caption=f"{record['caption_loss']:.3f}",
                             dense=f"{record['dense_loss']:.3f}")
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            accuracy = answer_accuracy(model, tokenizer, validation)
            record["validation"] = accuracy
            tqdm.write(f"step {step + 1}: validation {json.dumps(accuracy)}")
            model.save_pretrained(out)
            processor.save_pretrained(out)
            torch.save({"model": model.state_dict(), "head": head.state_dict(), "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(), "step": step + 1}, state_path)
        log.write(json.dumps(record) + "\n")
        log.flush()
    return accuracy
