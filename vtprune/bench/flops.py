"""Analytical FLOPs, counted as the papers count them (one multiply-add = one FLOP)."""

from __future__ import annotations


def decoder_layer_flops(n: int, d: int, m: int) -> int:
    """4nd^2 (q, k, v, o) + 2n^2d (scores and weighted sum) + 3ndm (a three-matrix SwiGLU MLP).

    The formula the papers use; with grouped-query attention (Qwen2-VL) the k/v
    projections are smaller and it overcounts them (about 8% per layer at 7B).
    """
    return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m


def vision_layer_flops(n: int, d: int, m: int) -> int:
    """A ViT block: the same attention terms and a two-matrix MLP."""
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def prefill_flops(model, tokens_per_layer: list[int], vision_tokens_per_image: list[int]) -> dict[str, int]:
    """One sample's prefill: the LM's layers at the token counts each saw, plus the vision tower per image
    (vision_tokens_per_image: CLIP's patches + CLS, or Qwen2-VL's patches before the 2x2 merge)."""
    text = model.config.text_config
    language = sum(decoder_layer_flops(n, text.hidden_size, text.intermediate_size) for n in tokens_per_layer)
    vision_config = model.config.vision_config
    if hasattr(vision_config, "image_size"):  # CLIP
        d, m, layers = vision_config.hidden_size, vision_config.intermediate_size, vision_config.num_hidden_layers
    else:  # Qwen2-VL's tower
        d, layers = vision_config.embed_dim, vision_config.depth
        m = int(d * vision_config.mlp_ratio)
    vision = sum(layers * vision_layer_flops(n, d, m) for n in vision_tokens_per_image)
    return {"language": language, "vision": vision, "total": language + vision}
