"""CLSE (ECCV 2026): cross-layer spectral evolution, as the authors' released code computes it.

At the first stage, each visual token's high-frequency magnitude (a Gaussian
high-pass of the 2-D FFT of the image's token grid, per channel, then the complex
magnitude averaged over channels) is measured at the LLM input (Z_L) and entering the
stage layer (Z_K). Tokens whose magnitude changed most, relative to the reference,
get a sigmoid gate near 1; the score is gate x last-query attention at layer K-1.
Later stages have no whole grid and use the attention alone. Three stages at decoder
layers 1/11/21 of 32 (1/10/19 of 28 for Qwen2-VL), with the authors' keep counts.

Per family, as the authors' code: on LLaVA the KV cache of the layers before each stage
is sliced to the kept tokens too; their Qwen2-VL code has that slicing commented out
(`Qwen2VL/clse_qwen2vl_model.py`), so on Qwen2-VL and Qwen2.5-VL the early layers'
cache stays whole by default (`slice_kv` overrides both). Qwen2-VL's keep counts are
ratios of the item's visual tokens: a table for the three reported retain ratios, the
multipliers 1.71/1.08/0.294 of the retain ratio otherwise (see qwen_keep_counts). Qwen2.5-VL takes
Qwen2-VL's settings (our reading: the authors released none for it).

Videos follow the authors' video branch (Video-LLaVA's): the reference at the input of layer 2, one stage before
layer 3 (scaled to depth), the score per frame, the budget over the whole video, the early layers' cache left
whole. Their video branch prunes only videos and their Qwen2-VL code only images: Video-LLaVA's images take the
LLaVA schedule, and a Qwen video the video branch (our extension).

Deviations:
- A grid of one row or column skips the high-pass (theirs: 0 / 0, every score NaN; high_frequency_magnitude).
- The Gaussian high-pass of the 2-D FFT is computed as the same filter by two circulant matmuls, equal to the FFT
  to float32 rounding and ~30x cheaper (high_frequency_magnitude).
- Budgets outside the authors' tables: LLaVA's counts are round(budget x their multipliers) (their code stops on
  a float count); a Qwen fraction is rounded to a count first, so a stage can keep one or two tokens other than
  their int(N x r x multiplier) (qwen_keep_counts).
- The attention (logits, softmax, mean over heads) is computed in float32; the authors' is the model's dtype
  (fp16 on LLaVA, bf16 on Qwen2-VL), whose rounding ties many scores that topk then orders by its own rule. Only
  tokens at the keep boundary can differ: by simulation ~0.1-0.4 tokens a stage in fp16, ~1-2 in bf16 (up to 3
  seen in an audit of a bf16 Qwen2-VL run against the authors' code).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .base import Grid, ImageView, Method, ModelInfo, Stage, scale_layers
from .primitives import same_shape, topk_in_order

SCORES = ("clse_attn", "clse", "attn")
# The authors' keep counts per stage for LLaVA-1.5's budgets; at any other budget, round(budget x their multipliers):
# our extension (their retain_token x multipliers gives floats that their topk refuses, so their code runs only at
# the table's budgets).
LLAVA_COUNTS = {192: (330, 210, 62), 128: (220, 140, 41), 64: (110, 70, 20)}
LLAVA_MULTIPLIERS = (1.72, 1.09, 0.32)
# Qwen2-VL (Qwen2VL/clse_qwen2vl_model.py): per retain ratio r, each stage keeps int(N x ratio) of the item's N
# visual tokens (at least 1): a table for the three reported ratios, r x the multipliers otherwise.
QWEN_RATIOS = {0.334: (0.57, 0.36, 0.098), 0.223: (0.38, 0.24, 0.066), 0.112: (0.19, 0.12, 0.034)}
QWEN_MULTIPLIERS = (1.71, 1.08, 0.294)
LLAVA_LAYERS, QWEN_LAYERS = ((1, 11, 21), 32), ((1, 10, 19), 28)
# The authors' video branch (Video-LLaVA, 32 layers): reference at the input of layer 2, one stage before layer 3.
VIDEO_LAYERS = ((2, 3), 32)
# The authors released Qwen2-VL settings; Qwen2.5-VL (same 28-layer LM at 7B) takes them too (our reading).
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl")


@functools.lru_cache(maxsize=64)
def gaussian_low_pass(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    """[size, size] the real circulant matrix that multiplies an axis's DFT by exp(-f^2 / (2 sigma^2)), f the
    signed frequency as fftshift centres it (-size//2 .. (size-1)//2): symmetric in f, so its kernel is real.
    Cached: a run asks for the same few grids at every stage."""
    frequency = torch.fft.fftfreq(size, d=1 / size, dtype=torch.float64)
    kernel = torch.fft.ifft(torch.exp(-frequency**2 / (2 * sigma**2))).real
    offset = (torch.arange(size)[:, None] - torch.arange(size)[None, :]) % size
    return kernel[offset].to(device=device, dtype=torch.float32)


def high_frequency_magnitude(tokens: torch.Tensor, grid: Grid | tuple[int, int], cutoff: float) -> torch.Tensor:
    """[..., N] per-token magnitude of the Gaussian high-passed token grid (tokens [..., N, C] in raster order, any
    leading dimensions: items filtered alike), averaged over channels.

    The authors filter each channel's centred 2-D FFT with 1 - exp(-(u^2 + v^2) / (2 sigma^2)) and take the
    magnitude of the inverse FFT. That Gaussian is separable and even, so the same filter is x minus a real
    row-wise and a column-wise circulant low-pass (gaussian_low_pass): two small matmuls instead of C complex
    FFTs (about 30x cheaper on a 24 x 24 grid; equal to the FFT's result to float32 rounding). A grid of several
    frames (a video) is filtered frame by frame, as the authors' video branch does (frames as the FFT's batch).
    A grid of one row or column (a banner image's merged Qwen grid) gives sigma 0, where the authors' Gaussian is
    0 / 0 and every score NaN (topk then keeps an arbitrary set); here the filter is skipped (deviation).
    """
    grid = grid if isinstance(grid, Grid) else Grid(*grid)
    rows, cols = grid.rows, grid.cols
    lead = tokens.shape[:-2]
    if grid.size == 0:  # a very wide or tall anyres image's high-res part can have no rows or columns
        return tokens.new_zeros(*lead, 0, dtype=torch.float32)
    planes = tokens.float().reshape(-1, grid.frames, rows, cols, tokens.shape[-1])
    sigma = min(rows // 2, cols // 2) * cutoff
    if sigma > 0:
        # The filter removes each plane's mean (it passes nothing at frequency 0); removed first, a constant plane
        # is exactly zero and the subtraction below cancels less.
        planes = planes - planes.mean(dim=(2, 3), keepdim=True)
        # Each filter multiplies a contiguous view from the left (rows: [rows, cols x C] a plane; columns:
        # [cols, C] a row): no operand is permuted into a copy, as an einsum over the middle axes would.
        batch, frames, _, _, channels = planes.shape
        low = gaussian_low_pass(rows, sigma, tokens.device) @ planes.reshape(-1, rows, cols * channels)
        low = gaussian_low_pass(cols, sigma, tokens.device) @ low.reshape(-1, cols, channels)
        planes = planes - low.reshape(batch, frames, rows, cols, channels)
    return planes.abs().mean(dim=-1).reshape(*lead, grid.size)


def item_magnitude(tokens: torch.Tensor, view: ImageView, cutoff: float) -> torch.Tensor:
    """high_frequency_magnitude of each part of whole items (tokens [..., N, C]; an anyres image's base and
    high-res grids apart)."""
    return torch.cat([high_frequency_magnitude(tokens[..., start : start + grid.size, :], grid, cutoff)
                      for start, grid in view.part_ranges()], dim=-1)


def evolution_gate(reference: torch.Tensor, current: torch.Tensor, tau: float) -> torch.Tensor:
    """sigmoid(z / tau) of the z-scored relative change of high-frequency magnitude, per token ([..., N]: the
    statistics are each item's own)."""
    mean = reference.mean(dim=-1, keepdim=True)
    change = ((current - reference).abs() / (mean + reference + 1e-6)).clamp(max=1.0)
    # unbiased std, epsilon outside, as the authors
    z = (change - change.mean(dim=-1, keepdim=True)) / (change.std(dim=-1, keepdim=True) + 1e-6)
    return torch.sigmoid(z / tau)


def qwen_keep_counts(budget: int, num_tokens: int) -> tuple[int, ...]:
    """Per stage, the tokens one Qwen2-VL item of num_tokens keeps at a budget, as the authors' code.

    The authors take a retain ratio r (an environment variable) and keep int(N x ratio) at
    each stage: the table's ratios when r is one of 0.334/0.223/0.112, else r x the
    multipliers. vtprune's budget reaches the method as a token count (a fraction budget
    is rounded by the engine): it is read as a table's r when that r rounds to it on this
    item (round(r x N) == budget, so budget=0.334 and budget=round(0.334 x N) agree; on
    items too small to tell the table's ratios apart, the one nearest budget / N), else as
    r = budget / N. So a fraction outside the table is taken as round(r x N) / N: a stage's
    count can differ by one or two from the authors' int(N x r x multiplier) (deviation).
    """
    ratio = budget / num_tokens
    matches = [r for r in QWEN_RATIOS if max(1, round(r * num_tokens)) == budget]
    if matches:
        table = QWEN_RATIOS[min(matches, key=lambda r: abs(r - ratio))]
        return tuple(max(1, int(num_tokens * share)) for share in table)
    return tuple(max(1, int(num_tokens * (ratio * m))) for m in QWEN_MULTIPLIERS)


def video_layers(model: ModelInfo) -> tuple[int, int]:
    """(reference layer, stage layer) of the authors' video branch, rescaled to this decoder's depth."""
    return scale_layers(*VIDEO_LAYERS, model.num_layers)


def scaled_layers(model: ModelInfo) -> tuple[int, ...]:
    """The authors' stage layers, rescaled to this decoder's depth."""
    layers, depth = QWEN_LAYERS if model.family in QWEN_FAMILIES else LLAVA_LAYERS
    return scale_layers(layers, depth, model.num_layers)


class CLSE(Method):
    name = "clse"
    summary = "spectral-evolution gate x last-query attention, 3 stages, authors' keep counts"
    where = "inside the LLM, layers 1/11/21 of 32"
    needs_attention = True
    needs_reference = True

    @dataclass(frozen=True)
    class Options:
        score: str = "clse_attn"  # or "clse" (gate only) or "attn" (attention only)
        layers: tuple[int, ...] | None = None  # stage layers; default: the authors', scaled to the depth
        keep: tuple[int, ...] | None = None  # tokens per image after each stage; default: the authors' counts
        cutoff: float = 0.1
        tau: float = 0.1
        # Drop pruned tokens from the KV cache of earlier layers too. None: as the authors per family (LLaVA
        # families slice; Qwen2-VL and Qwen2.5-VL, whose released code has the slicing commented out, do not).
        slice_kv: bool | None = None

    @classmethod
    def fixed_counts(cls, options: "CLSE.Options", kind: str) -> str | None:
        return "keep" if options.keep is not None and kind == "image" else None  # a video's follow the budget

    @classmethod
    def validate(cls, options: "CLSE.Options") -> None:
        if options.score not in SCORES:
            raise ValueError(f"clse score must be one of {', '.join(SCORES)}; got {options.score!r}")
        if options.layers is not None and options.keep is not None and len(options.layers) != len(options.keep):
            raise ValueError(f"clse needs one keep count per stage layer; got layers={options.layers} keep={options.keep}")
        if options.keep is not None and min(options.keep, default=1) < 1:
            raise ValueError(f"clse keep counts must each be >= 1 (tokens kept per image after a stage); got {options.keep}")
        if options.keep is not None and list(options.keep) != sorted(options.keep, reverse=True):
            raise ValueError(f"clse keep counts must not grow from stage to stage; got {options.keep}")
        if not (0 < options.tau < float("inf") and 0 <= options.cutoff < float("inf")):
            raise ValueError(f"clse needs a finite tau > 0 and cutoff >= 0; got tau={options.tau}, cutoff={options.cutoff}")

    @property
    def slices_kv_cache(self) -> bool:
        return self.options.slice_kv is not False  # on some family; slices_kv_cache_of says per item

    def item_stages(self, model: ModelInfo, budget: int, num_tokens: int, kind: str) -> list[Stage]:
        if kind != "video":
            return self.stages(model, budget, num_tokens)
        return [Stage(video_layers(model)[1], min(budget, num_tokens))]  # the budget counts the whole video

    def reference_layer(self, model: ModelInfo, kind: str) -> int:
        return video_layers(model)[0] if kind == "video" else 0

    def slices_kv_cache_of(self, kind: str, family: str) -> bool:
        if kind == "video":
            return False  # the video branch keeps the early layers' cache whole
        if self.options.slice_kv is None:
            return family not in QWEN_FAMILIES  # the authors' Qwen2-VL code leaves the cache whole
        return self.options.slice_kv

    def stages(self, model: ModelInfo, budget: int, num_tokens: int) -> list[Stage]:
        layers = self.options.layers or scaled_layers(model)
        counts = self.options.keep or self.keep_counts(model, budget, len(layers), num_tokens)
        if len(counts) != len(layers):
            raise ValueError(f"clse needs one keep count per stage layer; got layers={layers} keep={counts}")
        return [Stage(layer, min(count, num_tokens)) for layer, count in zip(layers, counts)]

    @staticmethod
    def keep_counts(model: ModelInfo, budget: int, stages: int, num_tokens: int) -> tuple[int, ...]:
        if model.family in QWEN_FAMILIES:
            counts = qwen_keep_counts(budget, num_tokens)
        else:
            counts = LLAVA_COUNTS.get(budget) or tuple(max(1, round(budget * m)) for m in LLAVA_MULTIPLIERS)
        if stages != len(counts):
            raise ValueError(f"clse's default keep counts are for 3 stages; pass keep=... for {stages} stage layers")
        return counts

    def gated(self, view: ImageView) -> bool:
        """Whether the view's score has the spectral gate: a whole item at the first stage (else attention alone)."""
        return self.options.score != "attn" and view.stage == 0 and view.whole

    def score(self, view: ImageView) -> torch.Tensor:
        return self.scores([view])[0]

    def scores(self, views: list[ImageView]) -> torch.Tensor:
        """[B, N] the scores of views alike (one shape, dtype, device and parts, all gated or none)."""
        attention = torch.stack([view.attention for view in views])
        if not self.gated(views[0]):
            return attention
        gate = evolution_gate(
            item_magnitude(torch.stack([view.reference for view in views]), views[0], self.options.cutoff),
            item_magnitude(torch.stack([view.hidden for view in views]), views[0], self.options.cutoff),
            self.options.tau,
        )
        return gate if self.options.score == "clse" else gate * attention.float()

    def select(self, view: ImageView) -> torch.Tensor:
        return self.select_batch([view])[0]

    def select_batch(self, views: list[ImageView]) -> list:
        """Views of one shape, parts and keep are scored and selected together."""
        keys = [(view.hidden.shape, view.hidden.dtype, view.hidden.device, view.attention.dtype, view.parts,
                 view.keep, self.gated(view)) for view in views]
        picks: list = [None] * len(views)
        for group in same_shape(keys):
            alike = [views[i] for i in group]
            for index, pick in zip(group, self.chosen(alike, topk_in_order(self.scores(alike), alike[0].keep))):
                picks[index] = pick
        return picks

    def chosen(self, views: list[ImageView], keep: torch.Tensor) -> list:
        """Each view's answer, given its kept tokens (keep [B, k])."""
        return list(keep)
