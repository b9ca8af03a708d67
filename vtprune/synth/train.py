"""`vtprune train-reference`: train the reference model from scratch on generated samples.

Each step takes a batch of generated images and asks a few questions about each: the
scene's own question and others its metadata answers (`questions.py`). Six losses:
- cross-entropy on each one-word answer (evaluation prompts end at "ASSISTANT:", so the
  answer is the first word generated);
- a caption after the scene's own answer (every object's colour and shape, and each
  plate's word, in reading order), LLaVA's caption pre-training in miniature;
- a dense loss that asks every visual token of the vision tower's output for the colour,
  shape and word under its patch, whether an object's centre is there, and the patch's
  row and column;
- a reading loss: one head of the first layer, at every visual token, should look at the
  question's words (the question-first prompt puts them before the image);
- a relevance probe on the LM's visual tokens one layer before the last: is this object
  token under one of the boxes that answer the question (which the question-first prompt
  lets it know);
- a grounding loss: one head of the last layer, at the position that predicts the
  answer, should put its attention on those tokens.
The auxiliary heads are not part of the saved model. Without the last three, runs sat at
the text-only prior (benchmarks/reference_training/README.md): the LM never learned to
make a visual token's state depend on the question.

`--depth deep` (issue 18) trains the deeper model of `reference.DEPTHS` with the image
before the question, from the shipped model's layers (`upscale.py`), and without the
last three losses (`ATTENTION_LOSSES`).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..eval.runner import answered_right
from ..methods.primitives import apply_rope
from .generator import COLOR_NAMES, OCR_WORDS, SHAPES, make_sample
from .questions import derived_questions
from .reference import (
    DEPTHS,
    GRID,
    IMAGE_TOKEN,
    PATCH,
    TRAIN_SEED,
    VALIDATION_SEED,
    CheckpointError,
    build_model,
    build_processor,
    build_tokenizer,
    load_llava,
    pixel_values,
    prompt,
    read_config,
)
from .upscale import upscale_into

PLATE_SHAPE = len(SHAPES) + 1  # plates are a "shape" of their own in the dense labels

# Weights of the losses that shape attention (reading: head 0 of the first layer; grounding: head 0 of
# the last layer) or that need visual tokens to know the question (relevance), per depth. The deep
# model has none: methods read attention in every layer, and with the image first no visual token
# sees the question, so the relevance probe could only learn "object or background".
ATTENTION_LOSSES = {"shipped": {"reading": 0.5, "grounding": 0.5, "relevance": 1.0},
                    "deep": {"reading": 0.0, "grounding": 0.0, "relevance": 0.0}}
HANDOFF = "handoff.pt"  # a run carried from another machine: weights, step and settings, no optimizer (handoff.py)
REWARM_STEPS = 100  # after a hand-off, the fresh optimizer's learning rate ramps up again over this many steps


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


def expanded(text: str) -> str:
    """A prompt with its image token repeated for the 576 visual tokens, as the processor expands it."""
    return text.replace(IMAGE_TOKEN, IMAGE_TOKEN * GRID * GRID)


def prompt_ids(tokenizer, question: str, prompt_format=prompt) -> list[int]:
    """The evaluation prompt's ids, its image token expanded to the 576 visual tokens as the processor does."""
    return tokenizer(expanded(prompt_format(question)))["input_ids"]


def encode_training(tokenizer, items: list[tuple[str, str, str | None, tuple]],
                    prompt_format=prompt) -> dict[str, torch.Tensor]:
    """Left-padded training rows: prompt, answer and, if given, a caption; plus what the auxiliary losses need.

    items: (question, answer, caption or None, boxes that answer it), one row each. Returns
    input_ids, attention_mask, the answer / caption targets (-100 elsewhere, aligned with
    input_ids: the logits one position earlier predict them), the position that predicts
    each answer, the keys it may attend to, and each row's relevant positions ([N, length]
    bool: the visual tokens under its boxes) and question positions ([N, length] bool).
    prompt_format: the model's prompt (question or image first).
    """
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    rows = []
    for question, answer, text, boxes in items:
        ids = prompt_ids(tokenizer, question, prompt_format)
        answer_at = len(ids)
        ids = ids + tokenizer(answer)["input_ids"] + (tokenizer(text)["input_ids"] if text else [])
        before = len(tokenizer(expanded(prompt_format(question)).split(question)[0])["input_ids"])
        rows.append((ids, answer_at, boxes, range(before, before + len(tokenizer(question)["input_ids"]))))
    length = max(len(ids) for ids, *_ in rows)
    n = len(rows)
    batch = {key: torch.full((n, length), -100, dtype=torch.long) for key in ("answer_targets", "caption_targets")}
    batch["input_ids"] = torch.full((n, length), tokenizer.pad_token_id, dtype=torch.long)
    batch["attention_mask"] = torch.zeros(n, length, dtype=torch.long)
    batch["relevant"] = torch.zeros(n, length, dtype=torch.bool)
    batch["question"] = torch.zeros(n, length, dtype=torch.bool)
    batch["query_positions"] = torch.zeros(n, dtype=torch.long)
    for r, (ids, answer_at, boxes, words) in enumerate(rows):
        start = length - len(ids)
        batch["input_ids"][r, start:] = torch.tensor(ids)
        batch["attention_mask"][r, start:] = 1
        batch["answer_targets"][r, start + answer_at] = ids[answer_at]
        batch["caption_targets"][r, start + answer_at + 1:] = torch.tensor(ids[answer_at + 1:], dtype=torch.long)
        batch["query_positions"][r] = start + answer_at - 1
        image_at = start + ids.index(image_token)
        batch["question"][r, start + words.start : start + words.stop] = True
        for box in boxes:
            batch["relevant"][r, image_at : image_at + GRID * GRID] |= torch.from_numpy(covered_patches(box).flatten())
    positions = torch.arange(length)
    batch["key_mask"] = batch["attention_mask"].bool() & (positions[None] <= batch["query_positions"][:, None])
    batch["visual"] = batch["input_ids"] == image_token
    return batch


def attention_mass_loss(layer, hidden: torch.Tensor, position_embeddings, queries: torch.Tensor,
                        keys_allowed: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """-log of the attention mass that head 0 of `layer` puts on the wanted keys, averaged over queries.

    Recomputed from the layer's input (hidden [N, T, D]) with its own norm, projections and
    RoPE. queries [N, M] positions; keys_allowed [N, M, T] what each may attend to (causal
    and padding); wanted [N, M, T] the keys it should attend to (queries without any are skipped).
    """
    attn = layer.self_attn
    rows = torch.arange(len(hidden), device=hidden.device)[:, None]
    cos, sin = (t.expand(len(hidden), -1, -1) for t in position_embeddings)  # [1, T, d] when rows share positions
    normed = layer.input_layernorm(hidden)
    query = attn.q_proj(normed[rows, queries]).view(*queries.shape, -1, attn.head_dim)[:, :, :1].transpose(1, 2)
    query = apply_rope(query, cos[rows, queries], sin[rows, queries])[:, 0]  # [N, M, d]
    keys = attn.k_proj(normed).view(*hidden.shape[:2], -1, attn.head_dim)[:, :, :1].transpose(1, 2)
    keys = apply_rope(keys, cos, sin)[:, 0]  # [N, T, d]
    logits = torch.einsum("nmd,ntd->nmt", query, keys) * attn.scaling
    log_attention = logits.masked_fill(~keys_allowed, -torch.inf).log_softmax(-1)
    has = wanted.any(dim=-1)
    return -torch.logsumexp(log_attention.masked_fill(~wanted, -torch.inf), dim=-1)[has].mean()


def grounding_loss(layer, hidden: torch.Tensor, position_embeddings, batch: dict) -> torch.Tensor:
    """Head 0 of `layer`, at the position that predicts the answer, should look at the question's boxes."""
    queries = batch["query_positions"][:, None]
    return attention_mass_loss(layer, hidden, position_embeddings, queries, batch["key_mask"][:, None],
                               batch["relevant"][:, None])


def reading_loss(layer, hidden: torch.Tensor, position_embeddings, batch: dict) -> torch.Tensor:
    """Head 0 of `layer`, at every visual token, should look at the question's words (before the image)."""
    visual = batch["visual"]
    queries = torch.stack([torch.nonzero(row).flatten() for row in visual])  # [N, 576]
    positions = torch.arange(visual.shape[1], device=visual.device)
    keys_allowed = batch["attention_mask"].bool()[:, None, :] & (positions[None, None, :] <= queries[..., None])
    wanted = (batch["question"][:, None, :] & keys_allowed)
    return attention_mass_loss(layer, hidden, position_embeddings, queries, keys_allowed, wanted)


def capture_layer_input(layer, store: dict, name: str) -> None:
    """Keep each forward's input to a decoder layer in store[name]: (hidden states, RoPE cos/sin)."""
    layer.register_forward_pre_hook(
        lambda module, args, kwargs: store.__setitem__(
            name, (args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"])),
        with_kwargs=True,
    )


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
        grid = torch.arange(GRID, device=labels.device)
        rows = grid.repeat_interleave(GRID).expand(len(labels), 1, -1)
        labels = torch.cat([labels.flatten(2), rows, grid.repeat(GRID).expand(len(labels), 1, -1)], 1)
        # Normalized first, so that this loss cannot grow the scale of the features the projector reads.
        features = nn.functional.layer_norm(features, features.shape[-1:])
        return sum(nn.functional.cross_entropy(probe(features).transpose(1, 2), labels[:, i])
                   for i, probe in enumerate(self.probes))


def word_alignment_loss(visual: torch.Tensor, labels: torch.Tensor, model, tokenizer) -> torch.Tensor:
    """Each visual token (the projector's output) should point the way the word for its colour, shape and
    plate word does in the LM's embedding table (cosine logits over those words plus "nothing").

    Then a question word and a matching visual token share a direction, and matching
    them is a dot product the LM finds at once instead of a relation it must discover.
    """
    embeddings = model.get_input_embeddings().weight
    total = 0.0
    for i, names in enumerate((COLOR_NAMES, SHAPES, OCR_WORDS)):
        words = embeddings[tokenizer.convert_tokens_to_ids(list(names))]
        target = labels[:, i].flatten(1)
        known = target > 0
        if names is SHAPES:
            known &= target <= len(SHAPES)  # plates have no shape word
        if not known.any():  # e.g. no plate in the batch
            continue
        cosine = nn.functional.normalize(visual[known], dim=-1) @ nn.functional.normalize(words, dim=-1).T
        total = total + nn.functional.cross_entropy(10 * cosine, target[known] - 1)
    return total


class TrainingBatches(torch.utils.data.Dataset):
    """Step i's batch: images i*B .. (i+1)*B - 1 of the training seed, each asked its own question
    (with the caption after the answer) and questions derived from its metadata.

    Built from the step number alone, so a resumed run, or any number of loader workers,
    sees the same batches. Besides `encode_training`'s rows: pixel_values and the dense
    patch labels per image, `firsts` (each image's first row) and `owners` (each row's image).
    """

    def __init__(self, tokenizer, batch_size: int, questions_per_image: int, prompt_format=prompt):
        self.tokenizer, self.batch_size, self.questions_per_image = tokenizer, batch_size, questions_per_image
        self.prompt_format = prompt_format

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        indices = [step * self.batch_size + i for i in range(self.batch_size)]
        samples = [make_sample(TRAIN_SEED, i) for i in indices]
        items, firsts, owners = [], [], []
        for index, sample in zip(indices, samples):
            rng = np.random.default_rng([TRAIN_SEED, index, 1])
            extra = [(q, a, None, boxes) for q, a, _, boxes in derived_questions(sample.meta, rng, self.questions_per_image)
                     if q != sample.question]
            own = (sample.question, sample.answer, caption(sample.meta), tuple(sample.meta["relevant"]))
            asked = ([own] + extra)[:self.questions_per_image]
            firsts.append(len(items))
            owners += [len(firsts) - 1] * len(asked)
            items += asked
        batch = encode_training(self.tokenizer, items, self.prompt_format)
        batch["pixel_values"] = pixel_values([s.image for s in samples])[owners]  # each image processed once
        batch["dense"] = torch.from_numpy(np.stack([patch_labels(s.meta) for s in samples]))
        batch["firsts"], batch["owners"] = torch.tensor(firsts), torch.tensor(owners)
        return batch


@torch.no_grad()
def answer_accuracy(model, processor, samples, batch_size: int = 32, prompt_format=prompt) -> dict[str, float]:
    """Greedy one-word answers against the truth, per class and overall, as `vtprune eval` asks them."""
    model.eval()
    hits: dict[str, list[bool]] = {}
    for sample, right in zip(samples, answered_right(model, processor, samples, prompt_format, batch_size)):
        hits.setdefault(sample.qclass, []).append(right)
    model.train()
    result = {c: float(np.mean(v)) for c, v in sorted(hits.items())}
    result["overall"] = float(np.mean([h for v in hits.values() for h in v]))
    return result


def learning_rate_factor(step: int, steps: int, warmup: int, rewarm_from: int | None = None) -> float:
    """Step `step`'s learning rate over the base: linear warm-up, then cosine decay to 5% at `steps`; after a
    hand-off (`rewarm_from`: the step it resumed at) a second warm-up, since the optimizer's moments start afresh."""
    factor = min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)))
    if rewarm_from is not None:
        factor *= min(1.0, (step - rewarm_from + 1) / REWARM_STEPS)
    return factor


def save_atomically(value, path: Path) -> None:
    """torch.save through a temporary file, so that a copy taken while a save is under way is the last whole one."""
    partial = path.with_name(path.name + ".partial")
    torch.save(value, partial)
    os.replace(partial, path)


def check_settings(saved: dict | None, settings: dict, path: Path) -> None:
    """A run resumes only with the settings it was started with: the batches and the schedule depend on them."""
    if saved is None:  # a state saved before settings were recorded
        return
    differ = {key: (saved.get(key), value) for key, value in settings.items() if saved.get(key) != value}
    if differ:
        listed = ", ".join(f"{key} {was!r} (now {now!r})" for key, (was, now) in differ.items())
        raise CheckpointError(f"{path} was saved by a run with other settings: {listed}; "
                              "resume with the same ones or use another --out")


def warm_start(model, head: nn.Module, relevance: nn.Module, init: Path) -> None:
    """Start from another run's folder: its weights (up-scaled if its model is shallower, `upscale.py`) and,
    if there and of the same widths, its auxiliary heads (a shipped model has none: they start afresh)."""
    config = read_config(init)
    source_depth = (config["text_config"]["num_hidden_layers"], config["vision_config"]["num_hidden_layers"])
    target_depth = (model.config.text_config.num_hidden_layers, model.config.vision_config.num_hidden_layers)
    source = load_llava(init, dtype=torch.float32)
    if source_depth == target_depth:
        model.load_state_dict(source.state_dict())
    else:
        tqdm.write(f"up-scaling {init} from {source_depth} to {target_depth} (LM, vision) layers")
        upscale_into(model, source)
    heads_file = Path(init) / "auxiliary_heads.pt"
    if heads_file.exists():
        heads = torch.load(heads_file)
        if heads["relevance"]["weight"].shape == relevance.weight.shape:
            head.load_state_dict(heads["head"])
            relevance.load_state_dict(heads["relevance"])


def train(
    out: Path,
    steps: int = 2000,
    batch_size: int = 12,
    questions_per_image: int = 2,
    lr: float = 1e-3,
    warmup: int = 100,
    dense_weight: float = 0.5,
    caption_weight: float = 0.5,
    grounding_weight: float | None = None,
    relevance_weight: float | None = None,
    reading_weight: float | None = None,
    alignment_weight: float = 0.5,
    eval_every: int = 250,
    eval_samples: int = 240,
    init: Path | None = None,
    seed: int = 0,
    device: str | None = None,
    workers: int | None = None,
    minutes: float | None = None,
    depth: str = "shipped",
) -> dict:
    """Train (resuming from out/ if a checkpoint or a hand-off is there); returns the last validation accuracy.

    Each step takes `batch_size` generated images and `questions_per_image` questions about
    each: the scene's own question (with the caption after its answer) and questions derived
    from its metadata (`questions.py`). `init` starts from another run's folder (its
    model.safetensors, up-scaled if shallower, and, if there, auxiliary_heads.pt) with a
    fresh optimizer and schedule. `minutes` stops early, validated and saved so that running
    again resumes, after that much wall time. `depth`: a key of `reference.DEPTHS`; the
    reading, grounding and relevance weights default to `ATTENTION_LOSSES[depth]`.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if workers is None:  # batches are built on the CPU (images, processor) while the model steps
        workers = min(15, (os.cpu_count() or 1) - 1)
    if device.type == "cuda":  # TensorFloat-32 matrix products: the deep model is ~2.5x the shipped one's compute
        torch.backends.cuda.matmul.allow_tf32 = True
    architecture = DEPTHS[depth]
    weights = dict(ATTENTION_LOSSES[depth])
    weights.update({name: value for name, value in (("reading", reading_weight), ("grounding", grounding_weight),
                                                    ("relevance", relevance_weight)) if value is not None})
    settings = {"depth": depth, "steps": steps, "batch_size": batch_size, "questions_per_image": questions_per_image,
                "lr": lr, "warmup": warmup, "seed": seed}
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer, image_first=architecture.image_first)
    model = build_model(tokenizer, seed=seed, depth=architecture)
    head = DenseHead(model.config.vision_config.hidden_size)
    relevance = nn.Linear(model.config.text_config.hidden_size, 1)
    state_path, handoff_path = out / "training_state.pt", out / HANDOFF
    resuming = state_path.exists() or handoff_path.exists()
    if init is not None and not resuming:
        warm_start(model, head, relevance, Path(init))
    model.to(device), head.to(device), relevance.to(device)
    params = list(model.parameters()) + list(head.parameters()) + list(relevance.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    start, rewarm_from = 0, None
    if state_path.exists():  # this machine's own last save: everything, the optimizer's moments included
        state = torch.load(state_path, weights_only=False, map_location=device)
        check_settings(state.get("settings"), settings, state_path)
        optimizer.load_state_dict(state["optimizer"])
        start, rewarm_from = state["step"], state.get("rewarm_from")
    elif handoff_path.exists():  # carried from another machine: no optimizer moments (handoff.py says why)
        state = torch.load(handoff_path, weights_only=False, map_location=device)
        check_settings(state["settings"], settings, handoff_path)
        start = rewarm_from = state["step"]
        tqdm.write(f"resuming a hand-off at step {start}: fresh optimizer, learning rate ramped over {REWARM_STEPS} steps")
    if resuming:
        model.load_state_dict({key: value.float() for key, value in state["model"].items()})
        head.load_state_dict(state["head"])
        relevance.load_state_dict(state["relevance"])

    features = {}
    model.model.vision_tower.encoder.register_forward_hook(
        lambda module, args, output: features.__setitem__("last", output.last_hidden_state)
    )
    model.model.multi_modal_projector.register_forward_hook(
        lambda module, args, output: features.__setitem__("projected", output))
    layers = model.model.language_model.layers
    for name, layer, loss_name in (("grounded", layers[-1], "grounding"), ("reading", layers[0], "reading"),
                                   ("probed", layers[-2], "relevance")):
        if weights[loss_name]:  # only the inputs a loss in use reads
            capture_layer_input(layer, features, name)
    validation = [make_sample(VALIDATION_SEED, i) for i in range(eval_samples)]
    log = (out / "train_log.jsonl").open("a")
    model.train()
    began = time.time()
    accuracy = {}
    batches = torch.utils.data.DataLoader(
        TrainingBatches(tokenizer, batch_size, questions_per_image, architecture.prompt), batch_size=None,
        sampler=range(start, steps), num_workers=workers, pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None)
    with log, tqdm(batches, initial=start, total=steps, desc="train-reference") as progress:
        for step, batch in enumerate(progress, start):
            batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
            rows, firsts, owners, dense = len(batch["input_ids"]), batch["firsts"], batch["owners"], batch["dense"]
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           pixel_values=batch["pixel_values"]).logits
            losses = {"answer": next_token_loss(logits, batch["answer_targets"]),
                      "caption": next_token_loss(logits, batch["caption_targets"]),
                      "dense": head.loss(features["last"][firsts, 1:], dense),
                      "alignment": word_alignment_loss(features["projected"][firsts], dense, model, tokenizer)}
            if weights["grounding"]:
                losses["grounding"] = grounding_loss(layers[-1], *features["grounded"], batch)
            if weights["reading"]:
                losses["reading"] = reading_loss(layers[0], *features["reading"], batch)
            if weights["relevance"]:
                # Over the tokens of objects and plates only: telling background from objects is easy and
                # would drown out the question-dependent part, which object is the one asked about.
                on_object = (dense[:, 0] > 0).flatten(1)[owners]  # [rows, 576]
                probed_states = features["probed"][0]
                probed = relevance(probed_states[batch["visual"]].view(rows, -1, probed_states.shape[-1]))
                losses["relevance"] = nn.functional.binary_cross_entropy_with_logits(
                    probed.squeeze(-1)[on_object], batch["relevant"][batch["visual"]].view(rows, -1)[on_object].float())
            loss_weights = {"answer": 1.0, "caption": caption_weight, "dense": dense_weight,
                            "alignment": alignment_weight, **weights}
            loss = sum(loss_weights[name] * value for name, value in losses.items())
            rate = lr * learning_rate_factor(step, steps, warmup, rewarm_from)
            for group in optimizer.param_groups:
                group["lr"] = rate
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            record = {"step": step + 1, **{f"{name}_loss": value.item() for name, value in losses.items()}, "lr": rate,
                      "elapsed_s": round(time.time() - began, 1)}
            progress.set_postfix({name: f"{value.item():.3f}" for name, value in losses.items()})
            out_of_time = minutes is not None and time.time() - began > 60 * minutes
            if (step + 1) % eval_every == 0 or step + 1 == steps or out_of_time:
                accuracy = answer_accuracy(model, processor, validation, prompt_format=architecture.prompt)
                record["validation"] = accuracy
                tqdm.write(f"step {step + 1}: validation {json.dumps(accuracy)}")
                model.save_pretrained(out)
                processor.save_pretrained(out)
                torch.save({"head": head.state_dict(), "relevance": relevance.state_dict()}, out / "auxiliary_heads.pt")
                save_atomically({"model": model.state_dict(), "head": head.state_dict(),
                                 "relevance": relevance.state_dict(), "optimizer": optimizer.state_dict(),
                                 "step": step + 1, "settings": settings, "rewarm_from": rewarm_from}, state_path)
            log.write(json.dumps(record) + "\n")
            log.flush()
            if out_of_time:
                break
    return accuracy
