"""Analytical FLOPs, counted as the papers count them (one multiply-add = one FLOP)."""

from __future__ import annotations


def decoder_layer_flops(n: int, d: int, m: int) -> int:
    """4nd^2 (q, k, v, o) + 2n^2d (scores and weighted sum) + 3ndm (a three-matrix SwiGLU MLP).

    The formula the papers use; with grouped-query attention (Qwen2-VL) the k/v
    projections are smaller and it overcounts them (about 8% per layer at 7B).
    """
    return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m


def vision_layer_flops(n: int, d: int, m: int, mlp_matrices: int = 2, spans: list[int] | None = None) -> int:
    """A ViT block: the same attention terms and an MLP of mlp_matrices matrices (CLIP's and Qwen2-VL's two,
    Qwen2.5-VL's three-matrix SwiGLU). spans: the lengths of the windows the n tokens attend within
    (default one window of all n), so the 2n^2d term becomes 2d * sum(span^2)."""
    attended = n * n if spans is None else sum(s * s for s in spans)
    return 4 * n * d * d + 2 * attended * d + mlp_matrices * n * d * m


def window_spans(vision_config, h: int, w: int) -> list[int]:
    """Qwen2.5-VL: the patches in each attention window of an image of (h, w) patches, as its tower cuts them
    (window_size pixels on a side, counted in 2x2-merged units; the windows at the right and bottom edges are
    smaller when the merged grid does not divide)."""
    merge = vision_config.spatial_merge_size
    size = vision_config.window_size // merge // vision_config.patch_size
    rows, cols = h // merge, w // merge
    heights = [min(size, rows - r) for r in range(0, rows, size)]
    widths = [min(size, cols - c) for c in range(0, cols, size)]
    return [a * b * merge * merge for a in heights for b in widths]


def prefill_flops(model, tokens_per_layer: list[int], vision_tokens_per_image: list[int],
                  vision_grids: list[tuple[int, int]] | None = None) -> dict[str, int]:
    """One sample's prefill: the LM's layers at the token counts each saw, plus the vision tower per sequence it runs
    (vision_tokens_per_image: CLIP's patches + CLS per image, or per tile on LLaVA-NeXT, where an image is several
    tiles (OneVision: SigLIP's patches per tile, no CLS), or per frame on Video-LLaVA's video tower; Qwen2-VL's
    patches before the 2x2 merge). Qwen2.5-VL's windowed blocks need each image's (h, w) patches in vision_grids;
    its full-attention blocks are counted as Qwen2-VL's."""
    text = model.config.text_config
    language = sum(decoder_layer_flops(n, text.hidden_size, text.intermediate_size) for n in tokens_per_layer)
    vision_config = model.config.vision_config
    if hasattr(vision_config, "image_size"):  # CLIP, or OneVision's SigLIP (a two-matrix MLP as well)
        d, m, layers = vision_config.hidden_size, vision_config.intermediate_size, vision_config.num_hidden_layers
        vision = sum(layers * vision_layer_flops(n, d, m) for n in vision_tokens_per_image)
    elif hasattr(vision_config, "fullatt_block_indexes"):  # Qwen2.5-VL's tower: windowed blocks, a few full ones
        if vision_grids is None or len(vision_grids) != len(vision_tokens_per_image):
            raise ValueError("Qwen2.5-VL's FLOPs need each image's (h, w) patches in vision_grids")
        d, m, depth = vision_config.hidden_size, vision_config.intermediate_size, vision_config.depth
        full = len(set(vision_config.fullatt_block_indexes))
        vision = sum(full * vision_layer_flops(n, d, m, 3)
                     + (depth - full) * vision_layer_flops(n, d, m, 3, window_spans(vision_config, h, w))
                     for n, (h, w) in zip(vision_tokens_per_image, vision_grids))
    else:  # Qwen2-VL's tower
        d, layers = vision_config.embed_dim, vision_config.depth
        m = int(d * vision_config.mlp_ratio)
        vision = sum(layers * vision_layer_flops(n, d, m) for n in vision_tokens_per_image)
    return {"language": language, "vision": vision, "total": language + vision}
