"""PyramidDrop / PDrop (CVPR'25): drop visual tokens in stages, each stage ranking by its own layer's attention.

The decoder is cut into stages; before each stage layer the item keeps the tokens the
prompt's last token attends to most, the attention computed with that stage layer's own
queries and keys on its input (its input norm, q/k projections and RoPE), softmax over
every token present (causal, padding excluded), averaged over heads. The keep counts are
ratios of the item's ORIGINAL visual length, int(N x ratio), not of the previous stage's.

Follows Cooperx521/PyramidDrop (HEAD 6444f30): `llava/model/modeling_llama_pdrop.py`,
`LlamaModel.pdrop_forward` (rank & drop after decoder layer idx when idx+1 is in
`layer_list`, scoring with `self.layers[idx+1]` on its input, i.e. vtprune's stage before
layer idx+1 with `probe_layer = "stage"`) and `pdrop_rank_drop` (query = row
`prompt_len + image_tokens - 1`, the prompt's last token at inference; softmax over the
whole causal row; mean over heads; top `int(N x ratio[s+1])` of the current image span,
kept in order). Their eval scripts (`scripts/v1_5/pdrop_eval/*.sh`, v1_6 too) all run
`--layer_list [8,16,24] --image_token_ratio_list [0.5,0.25,0.125]` (lambda = 0.5):
288 -> 144 -> 72 of 576.

Budget rule (vtprune's budget = tokens an item keeps after its last stage). The released
code has no setting per budget: the paper's 192/128/64 rows ("average tokens") have no
published layer/ratio lists (PyramidDrop issues 10, 22, 27, 28 ask; no answer), and with
layers 8/16/24 an average below N/4 is unreachable anyway. vtprune keeps the authors' layers
and their geometric schedule and fits lambda to the budget: lambda = (R / N)^(1/S) for S
stages, stage s keeps int(N x lambda^s) (s = 1..S-1) and the last keeps exactly R. At
R = N/8 (72 of 576) this is the authors' released setting exactly. `ratios=(...)` runs any
ratio list verbatim as the authors' `image_token_ratio_list` (each stage int(N x ratio);
the budget is then ignored), `layers=(...)` any layer list.

Deliberate deviations:
- Positions: after each drop the authors renumber position ids contiguously (0..len-1) for
  the layers after it (and shift them at decode); vtprune keeps every token's original
  position (the engine's rule for all methods). Later stages' q/k therefore carry the
  original RoPE phases, not the renumbered ones.
- Precision: the authors' softmax is float32 but is cast back to the model dtype (fp16)
  before the head mean and the top-k; vtprune keeps float32 (or the probe's precision, if
  higher) throughout, so near-ties may resolve differently.
- Per item: the released code handles one image per sample (the first placeholder) and,
  on LLaVA-NeXT, counts and may drop the image-newline tokens; vtprune schedules every
  visual item on its own N, and newline tokens are not an item's tokens (never dropped).
- Ties: torch.topk's order, as the authors'; kept tokens are returned in original order.
- A stage keeps at least one token: the authors' int(N x ratio) is 0 on an item of fewer than
  1/ratio tokens (e.g. a 4-token item at 0.125), and their top-0 would empty it.
- Training-time query (the token before each answer span) is not used: inference only.
- The KV cache of the layers before each stage keeps every token, as the authors' (their
  earlier layers ran, and cached, at full length): slices_kv_cache is False.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ImageView, LayerProbe, Method, ModelInfo, Stage, scale_layers
from .primitives import same_shape, topk_in_order

AUTHORS_LAYERS, AUTHORS_DEPTH = (8, 16, 24), 32


def stage_counts(budget: int, num_tokens: int, stages: int) -> tuple[int, ...]:
    """Per stage, the tokens an item of num_tokens keeps when lambda is fitted so the last stage keeps the budget."""
    budget = max(1, min(budget, num_tokens))
    ratio = budget / num_tokens
    counts = [int(num_tokens * ratio ** (s / stages) + 1e-6) for s in range(1, stages)] + [budget]
    return tuple(max(budget, min(num_tokens, count)) for count in counts)


def ratio_counts(ratios: tuple[float, ...], num_tokens: int) -> tuple[int, ...]:
    """The authors' keep counts for an image_token_ratio_list: int(N x ratio) per stage (at least 1)."""
    return tuple(max(1, min(num_tokens, int(num_tokens * ratio))) for ratio in ratios)


def last_token_attention(probes: list[LayerProbe]) -> torch.Tensor:
    """[B, L] head-averaged softmax attention of the prompt's last token over every row present (causal), for
    probes of one shape whose last rows are the same."""
    key = torch.stack([probe.key for probe in probes])
    dtype = torch.promote_types(key.dtype, torch.float32)
    last = probes[0].last
    query = torch.stack([probe.last_query() for probe in probes]).to(dtype)  # [B, H, d]
    keys = key[:, :, : last + 1].to(dtype)  # [B, H, last+1, d]: the causal row of the last token
    attention = (torch.einsum("bhd,bhld->bhl", query, keys) * probes[0].scaling).softmax(dim=-1).mean(dim=1)
    full = attention.new_zeros(key.shape[0], key.shape[2])
    full[:, : last + 1] = attention
    return full


class PDrop(Method):
    name = "pdrop"
    summary = "staged drops, each by the stage layer's own last-token attention; geometric keep ratios"
    where = "inside the LLM, layers 8/16/24 of 32"
    probe_layer = "stage"

    @dataclass(frozen=True)
    class Options:
        layers: tuple[int, ...] | None = None  # stage layers; default: the authors' 8/16/24 of 32, scaled to the depth
        # The authors' image_token_ratio_list: stage s keeps int(N x ratios[s]) of the item's original N (the budget
        # is then ignored). Default: lambda fitted so the last stage keeps the budget (see the module's docstring).
        ratios: tuple[float, ...] | None = None

    @classmethod
    def fixed_counts(cls, options: "PDrop.Options", kind: str) -> str | None:
        return None if options.ratios is None else "ratios"

    @classmethod
    def validate(cls, options: "PDrop.Options") -> None:
        if options.layers is not None and (not options.layers or min(options.layers) < 1):
            raise ValueError(f"pdrop needs stage layers >= 1 (each scores with its own attention); got {options.layers}")
        if options.ratios is not None:
            if not options.ratios or not all(0 < r <= 1 for r in options.ratios):
                raise ValueError(f"pdrop ratios must be in (0, 1]; got {options.ratios}")
            if list(options.ratios) != sorted(options.ratios, reverse=True):
                raise ValueError(f"pdrop ratios must not grow from stage to stage; got {options.ratios}")
            stages = len(options.layers) if options.layers is not None else len(AUTHORS_LAYERS)
            if len(options.ratios) != stages:
                raise ValueError(f"pdrop needs one ratio per stage layer ({stages}); got ratios={options.ratios}")

    def layers(self, model: ModelInfo) -> tuple[int, ...]:
        return self.options.layers or scale_layers(AUTHORS_LAYERS, AUTHORS_DEPTH, model.num_layers)

    def stages(self, model: ModelInfo, budget: int, num_tokens: int) -> list[Stage]:
        layers = self.layers(model)
        if self.options.ratios is not None:
            counts = ratio_counts(self.options.ratios, num_tokens)
        else:
            counts = stage_counts(budget, num_tokens, len(layers))
        return [Stage(layer, count) for layer, count in zip(layers, counts)]

    def select(self, view: ImageView) -> torch.Tensor:
        return self.select_batch([view])[0]

    def select_batch(self, views: list[ImageView]) -> list[torch.Tensor]:
        """Views whose probes have one shape and last row (a batch of prompts of one length) are scored together."""
        if any(view.probe is None for view in views):
            raise RuntimeError("pdrop scores with its stage layer's LayerProbe (probe_layer='stage'); the view has none")
        keys = [(view.probe.key.shape, view.probe.key.dtype, view.probe.key.device, view.probe.last,
                 view.probe.visual.shape, view.keep) for view in views]
        picks: list = [None] * len(views)
        for group in same_shape(keys):
            probes = [views[i].probe for i in group]
            visual = torch.stack([probe.visual.to(probe.key.device) for probe in probes])
            scores = last_token_attention(probes).gather(1, visual)
            for index, pick in zip(group, topk_in_order(scores, views[group[0]].keep)):
                picks[index] = pick
        return picks
