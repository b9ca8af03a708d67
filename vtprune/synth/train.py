"""`vtprune train-reference`: train the reference model from scratch on generated samples.

Each step encodes a batch of generated images and asks several questions about each:
the scene's own question and others its metadata answers (`questions.py`), packed
after one copy of the image prompt (`pack_questions`), so the LM pays for the 576
visual tokens once per image rather than once per question. Three losses: cross-entropy
on each one-word answer; a caption after the scene's own answer (every object's colour
and shape, and each plate's word, in reading order), the analogue of LLaVA's caption
pre-training, which teaches the LM to read its visual tokens; and an auxiliary dense
loss that asks every visual token (the vision tower's output that the projector reads)
for the colour, shape and word under its patch, whether an object's centre is there,
and the patch's row and column. The dense head is not part of the saved model.
Evaluation prompts end at "ASSISTANT:", so the answer is the first word generated.
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
from ..methods.primitives import apply_rope
from .questions import derived_questions
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


def covered_patches(box) -> np.ndarray:
    """[24, 24] bool: the patches whose centre lies in the box."""
    x0, y0, x1, y1 = box
    centres = np.arange(GRID) * PATCH + PATCH / 2
    return ((centres >= y0) & (centres <= y1))[:, None] & ((centres >= x0) & (centres <= x1))[None, :]


def patch_labels(meta: dict) -> np.ndarray:
    """[4, 24, 24] labels per patch: colour, shape, word (0 = none), from the boxes covering each patch
    centre, and 1 on the patch under each object's centre (one mark per object, for counting)."""
    labels = np.zeros((4, GRID, GRID), dtype=np.int64)
    for item in meta["objects"] + meta["plates"]:
        x0, y0, x1, y1 = item["box"]
        cover = covered_patches(item["box"])
        labels[0][cover] = COLOR_NAMES.index(item["color"]) + 1
        labels[1][cover] = SHAPES.index(item["shape"]) + 1 if "shape" in item else PLATE_SHAPE
        if "word" in item:
            labels[2][cover] = OCR_WORDS.index(item["word"]) + 1
        labels[3][min(int((y0 + y1) / 2 // PATCH), GRID - 1), min(int((x0 + x1) / 2 // PATCH), GRID - 1)] = 1
    return labels


def caption(meta: dict) -> str:
    """Every object and plate in reading order (four bands top to bottom, left to right in each)."""
    items = meta["objects"] + meta["plates"]
    items = sorted(items, key=lambda it: ((it["box"][1] + it["box"][3]) // 168, it["box"][0] + it["box"][2]))
    return " ".join(f"{it['color']} plate {it['word']}" if "word" in it else f"{it['color']} {it['shape']}" for it in items)


def encode(tokenizer, questions: list[str]):
    """Left-padded prompts, expanded as the processor expands them: input_ids and attention_mask."""
    rows = [tokenizer(prompt(q).replace(IMAGE_TOKEN, IMAGE_TOKEN * GRID * GRID))["input_ids"] for q in questions]
    length = max(map(len, rows))
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for b, row in enumerate(rows):
        input_ids[b, length - len(row):] = torch.tensor(row)
        mask[b, length - len(row):] = 1
    return input_ids, mask


def split_prompt(tokenizer, question: str) -> tuple[list[int], list[int]]:
    """A prompt's ids cut after its last visual token: the part every question about an image shares, and the rest."""
    ids = tokenizer(prompt(question).replace(IMAGE_TOKEN, IMAGE_TOKEN * GRID * GRID))["input_ids"]
    cut = len(ids) - ids[::-1].index(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    return ids[:cut], ids[cut:]


def pack_questions(tokenizer, asked: list[list[tuple[str, str, str | None, tuple]]]) -> dict[str, torch.Tensor]:
    """One row per image: its prompt prefix once, then every question asked about it, packed.

    asked[b] lists (question, answer, caption or None, boxes that answer it) for image b. Each question (with its
    answer and caption) sees the image prefix and itself only, at the positions it would have
    alone: a 4-D mask and explicit position ids make each question's logits those of its own
    prompt (tests/test_reference_training.py), while the LM encodes the 576 visual tokens once
    per image instead of once per question. Returns input_ids, attention_mask (4-D, True =
    attend), position_ids, the answer / caption targets (-100 elsewhere, aligned with
    input_ids: the logits one position earlier predict them), and for the grounding loss
    each question's row, the position that predicts its answer and its relevant
    positions ([N, length] bool: the visual tokens under its boxes).
    """
    prefix = split_prompt(tokenizer, "")[0]
    image_at = prefix.index(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    rows = []
    for questions in asked:
        ids, starts, answers, captions = list(prefix), [], [], []
        for question, answer, text, _ in questions:
            starts.append(len(ids))
            ids += split_prompt(tokenizer, question)[1]
            answers.append(len(ids))
            ids += tokenizer(answer)["input_ids"]
            caption_ids = tokenizer(text)["input_ids"] if text else []
            captions.append((len(ids), len(ids) + len(caption_ids)))
            ids += caption_ids
        rows.append((ids, starts, answers, captions))
    length = max(len(ids) for ids, *_ in rows)
    batch = {
        "input_ids": torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros(len(rows), 1, length, length, dtype=torch.bool),
        "position_ids": torch.zeros(len(rows), length, dtype=torch.long),
        "answer_targets": torch.full((len(rows), length), -100, dtype=torch.long),
        "caption_targets": torch.full((len(rows), length), -100, dtype=torch.long),
    }
    relevant = torch.zeros(sum(map(len, asked)), length, dtype=torch.bool)
    for n, (_, _, _, boxes) in enumerate(q for questions in asked for q in questions):
        for box in boxes:
            relevant[n, image_at : image_at + GRID * GRID] |= torch.from_numpy(covered_patches(box).flatten())
    batch["relevant"] = relevant
    batch["query_rows"] = torch.tensor([b for b, questions in enumerate(asked) for _ in questions])
    batch["query_positions"] = torch.tensor([at - 1 for _, _, answers, _ in rows for at in answers])
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for b, (ids, starts, answers, captions) in enumerate(rows):
        batch["input_ids"][b, : len(ids)] = torch.tensor(ids)
        mask = batch["attention_mask"][b, 0]
        mask[:, : len(prefix)] = causal[:, : len(prefix)]
        mask[len(ids):, 0] = True  # padding rows attend somewhere, so no softmax row is empty
        ends = starts[1:] + [len(ids)]
        batch["position_ids"][b, : len(prefix)] = torch.arange(len(prefix))
        for lo, hi, answer_at, (caption_lo, caption_hi) in zip(starts, ends, answers, captions):
            mask[lo:hi, lo:hi] = causal[: hi - lo, : hi - lo]
            batch["position_ids"][b, lo:hi] = torch.arange(len(prefix), len(prefix) + hi - lo)
            batch["answer_targets"][b, answer_at] = ids[answer_at]
            batch["caption_targets"][b, caption_lo:caption_hi] = torch.tensor(ids[caption_lo:caption_hi])
    return batch


def grounding_loss(layer, hidden: torch.Tensor, position_embeddings, batch: dict) -> torch.Tensor:
    """-log of the attention mass that one head of `layer` puts on each question's relevant visual tokens.

    Measured from the position that predicts the answer, recomputed from the layer's
    input (hidden [B, T, D]) with its own norm, projections and RoPE. Teaching one head
    where to look is what gets a small LM trained from scratch past the plateau where
    it answers from the question's wording alone; the other heads and layers are free.
    """
    attn = layer.self_attn
    rows, queries, relevant = batch["query_rows"], batch["query_positions"], batch["relevant"]
    cos, sin = position_embeddings
    normed = layer.input_layernorm(hidden)
    query = attn.q_proj(normed[rows, queries]).view(len(rows), -1, attn.head_dim)[:, None, :1]  # head 0
    query = apply_rope(query, cos[rows, queries][:, None], sin[rows, queries][:, None])[:, 0, 0]
    keys = attn.k_proj(normed).view(*hidden.shape[:2], -1, attn.head_dim)[:, :, :1].transpose(1, 2)
    keys = apply_rope(keys, cos, sin)[:, 0]
    logits = torch.einsum("nd,ntd->nt", query, keys[rows]) * attn.scaling
    log_attention = logits.masked_fill(~batch["attention_mask"][rows, 0, queries], -torch.inf).log_softmax(-1)
    has = relevant.any(dim=1)
    return -torch.logsumexp(log_attention.masked_fill(~relevant, -torch.inf), dim=1)[has].mean()


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of position t's logits against targets[t + 1]."""
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets[:, 1:].flatten(), ignore_index=-100)


class DenseHead(nn.Module):
    """Linear probes on each visual token: what is under its patch, and where the patch is.

    The position probes keep each token's row and column readable after the tower, which
    the spatial and half-of-the-image questions need.
    """

    def __init__(self, width: int):
        super().__init__()
        self.probes = nn.ModuleList([nn.Linear(width, len(COLOR_NAMES) + 1), nn.Linear(width, PLATE_SHAPE + 1),
                                     nn.Linear(width, len(OCR_WORDS) + 1), nn.Linear(width, 2),
                                     nn.Linear(width, GRID), nn.Linear(width, GRID)])

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(GRID).repeat_interleave(GRID).expand(len(labels), 1, -1)
        labels = torch.cat([labels.flatten(2), rows, torch.arange(GRID).repeat(GRID).expand(len(labels), 1, -1)], 1)
        # Normalized first, so that this loss cannot grow the scale of the features the projector reads.
        features = nn.functional.layer_norm(features, features.shape[-1:])
        return sum(nn.functional.cross_entropy(probe(features).transpose(1, 2), labels[:, i])
                   for i, probe in enumerate(self.probes))


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
    steps: int = 3000,
    batch_size: int = 16,
    questions_per_image: int = 8,
    lr: float = 1e-3,
    warmup: int = 200,
    dense_weight: float = 0.5,
    caption_weight: float = 0.5,
    grounding_weight: float = 0.5,
    grounding_layer: int = -1,
    eval_every: int = 250,
    eval_samples: int = 240,
    seed: int = 0,
) -> dict:
    """Train (resuming from out/ if a checkpoint is there); returns the last validation accuracy.

    Each step encodes `batch_size` generated images and asks `questions_per_image` questions
    about each: the scene's own question (with the caption after its answer) and questions
    derived from its metadata (`questions.py`).
    """
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
    grounded = model.model.language_model.layers[grounding_layer]
    grounded.register_forward_pre_hook(
        lambda module, args, kwargs: features.__setitem__(
            "grounded", (args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"])),
        with_kwargs=True,
    )
    validation = [make_sample(VALIDATION_SEED, i) for i in range(eval_samples)]
    log = (out / "train_log.jsonl").open("a")
    model.train()
    began = time.time()
    accuracy = {}
    progress = tqdm(range(start, steps), initial=start, total=steps, desc="train-reference")
    for step in progress:
        indices = [step * batch_size + i for i in range(batch_size)]
        samples = [make_sample(TRAIN_SEED, i) for i in indices]
        asked = []
        for index, sample in zip(indices, samples):
            rng = np.random.default_rng([TRAIN_SEED, index, 1])
            extra = [(q, a, None, boxes) for q, a, _, boxes in derived_questions(sample.meta, rng, questions_per_image)
                     if q != sample.question]
            own = (sample.question, sample.answer, caption(sample.meta), tuple(sample.meta["relevant"]))
            asked.append(([own] + extra)[:questions_per_image])
        batch = pack_questions(tokenizer, asked)
        dense = torch.from_numpy(np.stack([patch_labels(s.meta) for s in samples]))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], pixel_values=pixel_values([s.image for s in samples])).logits
        answer_loss = next_token_loss(logits, batch["answer_targets"])
        caption_loss = next_token_loss(logits, batch["caption_targets"])
        dense_loss = head.loss(features["last"][:, 1:], dense)
        ground_loss = grounding_loss(grounded, *features["grounded"], batch)
        loss = answer_loss + caption_weight * caption_loss + dense_weight * dense_loss + grounding_weight * ground_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        record = {"step": step + 1, "answer_loss": answer_loss.item(), "caption_loss": caption_loss.item(),
                  "dense_loss": dense_loss.item(), "grounding_loss": ground_loss.item(), "questions": sum(map(len, asked)),
                  "lr": schedule.get_last_lr()[0], "elapsed_s": round(time.time() - began, 1)}
        progress.set_postfix(answer=f"{record['answer_loss']:.3f}", caption=f"{record['caption_loss']:.3f}",
                             dense=f"{record['dense_loss']:.3f}", ground=f"{record['grounding_loss']:.3f}")
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
