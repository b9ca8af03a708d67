"""DART (EMNLP'25): keep the visual tokens least duplicated by a few pivot tokens, before decoder layer K.

Before layer K (2): pivots are the `pivot_image` (4) visual tokens and the `pivot_text` (4)
text tokens after the image with the largest L1 norm of their layer-(K-1) keys (RoPE
applied, all heads concatenated). Visiting the pivots one after another, each takes the
remaining visual tokens least cosine-similar to it (negated cosine, top-k), compared on the
hidden states entering layer K passed through the decoder's final norm (the model's last
RMSNorm, not layer K's input norm). The item keeps its image pivots and every token a pivot
took; text pivots only choose.

Follows ZichenWen1/DART (unreachable here; read as vendored by the same group in
Chenfei-Liao/VTC-Bench, HEAD 983e443, `external/DART/`):
`llava/model/language_model/modeling_llama_self.py`, `DART.forward` (at
`decoder_layer.self_attn.layer_idx == K`: `last_layer_state = self.norm(layer_outputs[0])`,
the output of layer K-1 through the final norm; `any_states = layer_outputs[-2]`, layer
K-1's key states after RoPE and repeat_kv) and `DART.get_retained_image_token`; the
Qwen2-VL / Qwen2.5-VL copies (`Qwen2VL_DART/modeling_qwen2_vl_self.py`,
`Qwen2_5VL_DART/modeling_qwen2_5_vl_self.py`) do the same. Defaults from
`llava/eval/model_vqa_loader.py` and `scripts/v1_5/eval/*.sh`: K = 2, 4 + 4 pivots.

What the authors' code pins, and vtprune does alike:
- Text pivots come from the tokens AFTER the image span only (`[start + length:]`: the
  question and the assistant prefix), never the system prompt before it. vtprune: the
  prompt's text rows after the item's last token (all text rows if none follow it).
- Pivots are visited in the iteration order of a Python set of their sequence positions
  (`for item in list(set(image_indices + query_indices))`, image pivots first, each group in
  descending key norm); vtprune builds the same set of its probe rows (= sequence positions
  at this single, first stage), so the visit order, which decides what each pivot can still
  take, is the authors'. Candidates are scanned in ascending position (ties only).

Budget rule (vtprune keeps exactly the budget; a deviation): the authors give each of the
P = 8 pivots TOKEN_TOPK = floor(R / 8) tokens and keep the 4 image pivots too, so "128"
keeps 4 + 8 x 16 = 132 (LLaVA: `ceil(R // 8)`; Qwen: `int(N (1 - ratio) / 8)`). vtprune
keeps exactly `keep`: the image pivots (min(4, keep)), then keep - pivots spread over the
pivots in visit order, floor((keep - p) / P) each and one more for the first
(keep - p) mod P of them. When keep - 4 is a multiple of 8 this is the authors' selection
exactly; `authors_count=True` makes the stage keep their count, 4 + 8 floor(R / 8).

Positions: an L1 norm of RoPE'd keys depends on absolute positions (RoPE keeps L2 norms,
not L1). The authors run batch 1, positions 0.. from the prompt's first token; the keys
must be rotated at those sample-relative positions (what HF generate passes for a
left-padded batch, attention_mask.cumsum - 1), or a left-padded sample's pivots depend on
its padding. That is the engine's to give (probe.key); this file assumes it.

Other deliberate deviations:
- Precision: the authors take the L1 norms and cosines in the model dtype (fp16); vtprune
  in float32 (or the inputs' precision, if higher). Near-ties may resolve differently.
- One image per sample in their code (a single span from fixed indices: 35 + 576 on LLaVA,
  the first <|image_pad|> on Qwen); vtprune runs per visual item. On LLaVA-NeXT their span
  includes the image-newline tokens; here those are not an item's tokens.
- Fewer text tokens after the image than pivot_text: all of them are pivots (the authors'
  top-k would fail). Without any pivot (no image pivot, no text): top-keep by key norm.
- Where their budget exceeds what is left (their top-k would fail), vtprune cannot: the
  counts sum to keep <= N.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ImageView, LayerProbe, Method, ModelInfo, Stage


def _precision(tensor: torch.Tensor) -> torch.dtype:
    return torch.promote_types(tensor.dtype, torch.float32)


def key_l1(probe: LayerProbe) -> torch.Tensor:
    """[L] L1 norm of each row's key over all heads and channels (the authors' heads-concatenated key)."""
    return probe.key.to(_precision(probe.key)).abs().sum(dim=(0, 2))


def text_candidates(probe: LayerProbe) -> torch.Tensor:
    """Rows of the prompt's text tokens after the item (all text rows when none follow it)."""
    text = probe.text.to(probe.visual.device)
    after = text[text > probe.visual.max()] if probe.visual.numel() else text
    return after if after.numel() else text


def pivots(probe: LayerProbe, keep: int, pivot_image: int, pivot_text: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(image pivots as indices into the view, text pivots as probe rows), each in descending key norm."""
    norms = key_l1(probe)
    n = probe.visual.numel()
    image = torch.topk(norms[probe.visual], min(pivot_image, keep, n)).indices
    text = text_candidates(probe)
    text = text[torch.topk(norms[text], min(pivot_text, text.numel())).indices]
    return image, text


def per_pivot_counts(remaining: int, pivots: int) -> list[int]:
    """remaining tokens over the pivots in visit order: an even share each, one more for the first remaining % pivots."""
    base, extra = divmod(remaining, pivots)
    return [base + (j < extra) for j in range(pivots)]


class DART(Method):
    name = "dart"
    summary = "pivots by key L1 norm (4 visual + 4 text); keep the tokens least similar to each pivot"
    where = "inside the LLM, before layer 2"
    probe_layer = "previous"  # layer K-1's keys (RoPE applied); the final-normed states entering layer K: probe.normed
    # Asks the engine for LayerProbe.normed: [L, D], the decoder's final norm (the language model's `norm`) applied to
    # the hidden states entering the stage layer K, over the probe's rows.
    probe_normed = True

    @dataclass(frozen=True)
    class Options:
        layer: int = 2  # K: the tokens are dropped before decoder layer K
        pivot_image: int = 4
        pivot_text: int = 4
        # Keep the authors' count, pivot_image + (pivot_image + pivot_text) x floor(budget / (that sum)), instead of
        # exactly the budget ("128" keeps 132).
        authors_count: bool = False

    @classmethod
    def validate(cls, options: "DART.Options") -> None:
        if options.layer < 1:
            raise ValueError(f"dart needs layer >= 1 (it scores with the keys of layer K-1); got {options.layer}")
        if options.pivot_image < 0 or options.pivot_text < 0 or options.pivot_image + options.pivot_text < 1:
            raise ValueError("dart needs pivot_image, pivot_text >= 0 and at least one pivot")

    def stages(self, model: ModelInfo, budget: int, num_tokens: int) -> list[Stage]:
        keep = budget
        if self.options.authors_count:
            total = self.options.pivot_image + self.options.pivot_text
            keep = min(self.options.pivot_image, num_tokens) + total * (budget // total)
        return [Stage(self.options.layer, max(1, min(keep, num_tokens)))]

    def select(self, view: ImageView) -> torch.Tensor:
        probe = view.probe
        normed = getattr(probe, "normed", None)
        if probe is None or normed is None:
            raise RuntimeError("dart needs a LayerProbe of layer K-1 with `normed` (the final-normed states entering "
                               "layer K); the view has none")
        n, keep = probe.visual.numel(), view.keep
        device = probe.visual.device
        if keep >= n:
            return torch.arange(n, device=device)
        image, text = pivots(probe, keep, self.options.pivot_image, self.options.pivot_text)
        rows = probe.visual[image].tolist() + text.tolist()
        order = list(set(rows))  # the authors' visit order: a Python set of sequence positions
        if not order:
            return torch.topk(key_l1(probe)[probe.visual], keep).indices
        unit = torch.nn.functional.normalize(normed.to(_precision(normed)), dim=-1)
        visual = unit[probe.visual]  # [N, D]
        available = torch.ones(n, dtype=torch.bool, device=device)
        available[image] = False
        chosen = [image]
        for row, count in zip(order, per_pivot_counts(keep - image.numel(), len(order))):
            if count == 0:
                continue
            candidates = torch.nonzero(available).flatten()
            similarity = visual[candidates] @ unit[row]
            taken = candidates[torch.topk(-similarity, count).indices]
            available[taken] = False
            chosen.append(taken)
        return torch.cat(chosen)
