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
  take, is the authors'.

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
- Exact ties of a pivot's cosines: the authors' topk runs over the list of the candidates still
  free, vtprune's over the whole row with the taken ones masked; torch's topk breaks ties by
  place in its input, so the two can take different tokens among exactly equal cosines (which
  real activations do not produce; tied image-pivot key norms are picked alike, a test).
- One image per sample in their code (a single span from fixed indices: 35 + 576 on LLaVA,
  the first <|image_pad|> on Qwen); vtprune runs per visual item. On LLaVA-NeXT their span
  includes the image-newline tokens; here those are not an item's tokens.
- Fewer text tokens after the image than pivot_text: all of them are pivots (the authors'
  top-k would fail). Without any pivot (no image pivot, no text): top-keep by key norm.
- Where their budget exceeds what is left (their top-k would fail), vtprune cannot: the
  counts sum to keep <= N.
- Positions: the kept tokens keep their original positions (the authors pack the shortened
  sequence and renumber it), as the engine does for every method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ImageView, LayerProbe, Method, ModelInfo, Stage
from .primitives import gather_rows, on_device, same_shape


def _precision(tensor: torch.Tensor) -> torch.dtype:
    return torch.promote_types(tensor.dtype, torch.float32)


def key_l1(key: torch.Tensor) -> torch.Tensor:
    """[..., L] L1 norm of each row's key ([..., H, L, d]) over all heads and channels (the authors' heads-concatenated
    key)."""
    return key.to(_precision(key)).abs().sum(dim=(-3, -1))


def pivots(probes: list[LayerProbe], keep: int, pivot_image: int, pivot_text: int):
    """For probes of one shape: (image pivots [B, p] as indices into the views, text pivots [B, t] as probe rows,
    each in descending key norm, and which text pivots there are [B, t]: the text rows after the item (all text rows
    when none follow it), up to pivot_text of them)."""
    key = torch.stack([probe.key for probe in probes])
    visual = torch.stack([probe.visual for probe in probes]).to(key.device)
    text = torch.stack([probe.text for probe in probes]).to(key.device)
    norms = key_l1(key)  # [B, L]
    image = torch.topk(norms.gather(1, visual), min(pivot_image, keep, visual.shape[1]), dim=1).indices
    after = text > visual.amax(dim=1, keepdim=True)
    candidate = torch.where(after.any(dim=1, keepdim=True), after, True)
    count = min(pivot_text, text.shape[1])
    top = torch.topk(norms.gather(1, text).masked_fill(~candidate, -torch.inf), count, dim=1).indices
    present = torch.arange(count, device=key.device) < candidate.sum(dim=1, keepdim=True)
    return image, text.gather(1, top), present


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
        return self.select_batch([view])[0]

    def select_batch(self, views: list[ImageView]) -> list[torch.Tensor]:
        """Pivots are found for probes of one shape together, their rows read from the device once for the batch
        (the visit order is a Python set of them, as the authors'), and each group of views with as many pivots
        takes its tokens in one loop over pivots."""
        for view in views:
            if view.probe is None or getattr(view.probe, "normed", None) is None:
                raise RuntimeError("dart needs a LayerProbe of layer K-1 with `normed` (the final-normed states "
                                   "entering layer K); the view has none")
        picks: list = [None] * len(views)
        pruned = [i for i, view in enumerate(views) if view.keep < view.probe.visual.numel()]
        for i in set(range(len(views))) - set(pruned):
            picks[i] = torch.arange(views[i].probe.visual.numel(), device=views[i].probe.visual.device)
        found = {}  # view index -> its image pivots [p] (indices into the view), on the device
        groups = same_shape([(views[i].probe.key.shape, views[i].probe.key.dtype, views[i].probe.key.device,
                              views[i].probe.visual.shape, views[i].probe.text.shape, views[i].keep) for i in pruned])
        rows = []
        for group in groups:
            members = [pruned[g] for g in group]
            image, text, present = pivots([views[i].probe for i in members], views[members[0]].keep,
                                          self.options.pivot_image, self.options.pivot_text)
            visual = torch.stack([views[i].probe.visual for i in members]).to(image.device)
            rows.append(torch.cat([visual.gather(1, image), torch.where(present, text, -1)], dim=1))
            found.update({i: image[j] for j, i in enumerate(members)})
        read = torch.cat([r.flatten().cpu() for r in rows]).tolist() if rows else []  # the batch's one host read
        orders, start = {}, 0
        for group, row_block in zip(groups, rows):
            width = row_block.shape[1]
            for g in group:
                # the authors' visit order: a Python set of sequence positions
                orders[pruned[g]] = list(set(r for r in read[start:start + width] if r >= 0))
                start += width
        for group in same_shape([(views[i].probe.normed.shape, views[i].probe.normed.dtype, views[i].probe.visual.shape,
                                  views[i].keep, found[i].numel(), len(orders[i])) for i in pruned]):
            members = [pruned[g] for g in group]
            for i, pick in zip(members, self._take([views[i] for i in members], [found[i] for i in members],
                                                   [orders[i] for i in members])):
                picks[i] = pick
        return picks

    def _take(self, views: list[ImageView], image: list[torch.Tensor], orders: list[list[int]]) -> torch.Tensor:
        """[B, keep] each view's image pivots and the tokens each pivot, in visit order, finds least like it."""
        probes = [view.probe for view in views]
        keep = views[0].keep
        if not orders[0]:  # no pivot at all (no image pivot, no text): top-keep by key norm
            norms = key_l1(torch.stack([probe.key for probe in probes]))
            visual = torch.stack([probe.visual for probe in probes]).to(norms.device)
            return torch.topk(norms.gather(1, visual), keep, dim=1).indices
        normed = torch.stack([probe.normed for probe in probes])
        unit = torch.nn.functional.normalize(normed.to(_precision(normed)), dim=-1)  # [B, L, D]
        device = unit.device
        visual = torch.stack([probe.visual for probe in probes]).to(device)
        tokens = gather_rows(unit, visual)  # [B, N, D]
        pivot = gather_rows(unit, on_device(torch.tensor(orders), device))  # [B, P, D]
        similarity = tokens @ pivot.transpose(1, 2)  # [B, N, P]
        image = torch.stack(image).to(device)
        available = torch.ones(visual.shape, dtype=torch.bool, device=device).scatter_(1, image, False)
        chosen = [image]
        for j, count in enumerate(per_pivot_counts(keep - image.shape[1], len(orders[0]))):
            if count == 0:
                continue
            taken = torch.topk((-similarity[..., j]).masked_fill(~available, -torch.inf), count, dim=1).indices
            available.scatter_(1, taken, False)
            chosen.append(taken)
        return torch.cat(chosen, dim=1)
