"""Tiny random models of each supported family and prompts for them: tests, the demo and CPU benchmarks.

Built from configs in milliseconds; nothing is downloaded.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import (
    AutoConfig,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedConfig,
    Qwen2Config,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    SiglipVisionConfig,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
)

VOCAB = 128
IMAGE_TOKEN = 100  # LLaVA's placeholder in the tiny vocabulary
QWEN_IMAGE_TOKEN, QWEN_VISION_START, QWEN_VISION_END, QWEN_VIDEO_TOKEN = 101, 102, 103, 104
VIDEO_TOKEN = 104  # Video-LLaVA's video placeholder in the tiny vocabulary
PAD = 0
TEXT_TOKENS = range(3, 96)  # ids a tiny prompt is drawn from


def _clip_tower(patch_size: int) -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
                            image_size=56, patch_size=patch_size, projection_dim=32)


def _llama(layers: int, model_type: str = "llama", **extra) -> PreTrainedConfig:
    """The tiny decoder's config; another model_type (LLaVA's text_config takes any) at the same sizes."""
    return AutoConfig.for_model(model_type, vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=512, pad_token_id=PAD, **extra)


def tiny_llava(attn_implementation: str = "sdpa", seed: int = 0, layers: int = 4, text: str = "llama",
               **text_options) -> LlavaForConditionalGeneration:
    """LLaVA-1.5 in miniature: a CLIP tower on 56 px with patch 7 (an 8x8 grid, 64 tokens per image); its decoder a
    Llama, or another model_type with text_options."""
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=_clip_tower(patch_size=7), text_config=_llama(layers, text, **text_options),
        image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        attn_implementation=attn_implementation,
    )
    return LlavaForConditionalGeneration(config).eval()


def tiny_llava_next(attn_implementation: str = "sdpa", seed: int = 0, layers: int = 4) -> LlavaNextForConditionalGeneration:
    """LLaVA-NeXT in miniature: 56 px tiles with patch 14 (a 4x4 base grid), anyres up to 2x2 tiles."""
    torch.manual_seed(seed)
    config = LlavaNextConfig(
        vision_config=_clip_tower(patch_size=14), text_config=_llama(layers),
        image_token_id=IMAGE_TOKEN,
        image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        attn_implementation=attn_implementation,
    )
    return LlavaNextForConditionalGeneration(config).eval()


def tiny_video_llava(attn_implementation: str = "sdpa", seed: int = 0, layers: int = 4) -> VideoLlavaForConditionalGeneration:
    """Video-LLaVA in miniature: 56 px CLIP towers with patch 14 (a 4x4 grid); a video frame adds its CLS token."""
    torch.manual_seed(seed)
    config = VideoLlavaConfig(
        vision_config=_clip_tower(patch_size=14), text_config=_llama(layers),
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        attn_implementation=attn_implementation,
    )
    return VideoLlavaForConditionalGeneration(config).eval()


def tiny_llava_onevision(attn_implementation: str = "sdpa", seed: int = 0,
                         layers: int = 4) -> LlavaOnevisionForConditionalGeneration:
    """LLaVA-OneVision in miniature: a 56 px SigLIP tower with patch 14 (4x4 grids), anyres up to 3x3 tiles,
    video frames pooled to 2x2."""
    torch.manual_seed(seed)
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=56, patch_size=14),
        text_config=Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                pad_token_id=PAD, bos_token_id=None, eos_token_id=None),
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_feature_layer=-1,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=[[56 * i, 56 * j] for i in range(1, 4) for j in range(1, 4)],
        attn_implementation=attn_implementation,
    )
    return LlavaOnevisionForConditionalGeneration(config).eval()


def _qwen_text_config(layers: int) -> dict:
    return {
        "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": layers,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        "pad_token_id": PAD,
    }


QWEN_TOKENS = dict(image_token_id=QWEN_IMAGE_TOKEN, vision_start_token_id=QWEN_VISION_START,
                   vision_end_token_id=QWEN_VISION_END, video_token_id=QWEN_VIDEO_TOKEN)


def tiny_qwen2_vl(attn_implementation: str = "sdpa", seed: int = 0, layers: int = 4) -> Qwen2VLForConditionalGeneration:
    """Qwen2-VL in miniature: patch 14, 2x2 merge; an image of (h, w) patches gives (h/2)(w/2) tokens."""
    torch.manual_seed(seed)
    config = Qwen2VLConfig(
        vision_config={
            "depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 4, "mlp_ratio": 2,
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3,
        },
        text_config=_qwen_text_config(layers), attn_implementation=attn_implementation, **QWEN_TOKENS,
    )
    return Qwen2VLForConditionalGeneration(config).eval()


def tiny_qwen2_5_vl(attn_implementation: str = "sdpa", seed: int = 0, layers: int = 4) -> Qwen2_5_VLForConditionalGeneration:
    """Qwen2.5-VL in miniature: Qwen2-VL's geometry, with window attention in the vision tower (one full block)."""
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        vision_config={
            "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
            "window_size": 56, "fullatt_block_indexes": [1], "patch_size": 14, "spatial_merge_size": 2,
            "temporal_patch_size": 2, "in_channels": 3,
        },
        text_config=_qwen_text_config(layers), attn_implementation=attn_implementation, **QWEN_TOKENS,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


@dataclass
class SampleLayout:
    """One sample of a tiny prompt: text lengths around each image, in order."""

    images: int = 1
    text_before: int = 3
    text_between: int = 2
    text_after: int = 4
    qwen_grid: tuple[int, int] = (8, 12)  # patches (h, w) of each Qwen image
    next_sizes: tuple[tuple[int, int], ...] = ((60, 120), (100, 100))  # (h, w) in pixels of LLaVA-NeXT images, in turn
    videos: int = 0  # after the images (Qwen families, Video-LLaVA)
    qwen_video: tuple[int, int, int] = (3, 4, 6)  # temporal patches, patches (h, w) of each Qwen video
    frames: int = 4  # of each Video-LLaVA video


def tiny_inputs(model, samples: list[SampleLayout], padding_side: str = "left", seed: int = 0,
                batch_num_images: bool = False) -> dict:
    """input_ids, attention_mask and vision inputs for a batch of tiny prompts (samples may differ in length).

    batch_num_images (LLaVA-OneVision): pass each sample's image count, as its processor does, so that a sample
    of several images gets each image's base grid only (the model's multi-image mode)."""
    generator = torch.Generator().manual_seed(seed)
    is_qwen = isinstance(model, (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration))
    is_next = isinstance(model, LlavaNextForConditionalGeneration)
    is_video_llava = isinstance(model, VideoLlavaForConditionalGeneration)
    is_onevision = isinstance(model, LlavaOnevisionForConditionalGeneration)

    def text(n):
        return torch.randint(TEXT_TOKENS.start, TEXT_TOKENS.stop, (n,), generator=generator).tolist()

    rows, pixel_values, grids, sizes, videos, video_grids = [], [], [], [], [], []
    for layout in samples:
        ids = text(layout.text_before)
        for i in range(layout.images):
            if i:
                ids += text(layout.text_between)
            if is_qwen:
                h, w = layout.qwen_grid
                ids += [QWEN_VISION_START] + [QWEN_IMAGE_TOKEN] * (h * w // 4) + [QWEN_VISION_END]
                pixel_values.append(torch.randn(h * w, 3 * 2 * 14 * 14, generator=generator))
                grids.append([1, h, w])
            elif is_next or is_onevision:
                size = layout.next_sizes[i % len(layout.next_sizes)]
                # base + up to 2x2 (NeXT) or 3x3 (OneVision) tiles; unused ones are ignored
                patches = torch.randn(10 if is_onevision else 5, 3, 56, 56, generator=generator)
                images = layout.images if batch_num_images and is_onevision else None
                ids += [IMAGE_TOKEN] * _anyres_token_count(model, patches, size, images)
                pixel_values.append(patches)
                sizes.append(list(size))
            else:
                ids += [IMAGE_TOKEN] * (16 if is_video_llava else 64)
                pixel_values.append(torch.randn(3, 56, 56, generator=generator))
        for _ in range(layout.videos):
            ids += text(layout.text_between)
            if is_video_llava or is_onevision:
                # Video-LLaVA: each frame's CLS token and 4x4 patches; OneVision: 2x2 pooled frames, then a newline
                ids += [VIDEO_TOKEN] * (layout.frames * 17 if is_video_llava else layout.frames * 4 + 1)
                videos.append(torch.randn(layout.frames, 3, 56, 56, generator=generator))
                continue
            if not is_qwen:
                raise ValueError(f"tiny_inputs builds no videos for {type(model).__name__}")
            t, h, w = layout.qwen_video
            ids += [QWEN_VISION_START] + [QWEN_VIDEO_TOKEN] * (t * h * w // 4) + [QWEN_VISION_END]
            videos.append(torch.randn(t * h * w, 3 * 2 * 14 * 14, generator=generator))
            video_grids.append([t, h, w])
        ids += text(layout.text_after)
        rows.append(ids)

    length = max(map(len, rows))
    input_ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for b, ids in enumerate(rows):
        where = slice(length - len(ids), length) if padding_side == "left" else slice(0, len(ids))
        input_ids[b, where] = torch.tensor(ids)
        attention_mask[b, where] = 1
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if is_qwen:
        if pixel_values:
            inputs["pixel_values"] = torch.cat(pixel_values)
            inputs["image_grid_thw"] = torch.tensor(grids)
        if videos:
            inputs["pixel_values_videos"] = torch.cat(videos)
            inputs["video_grid_thw"] = torch.tensor(video_grids)
        if pixel_values or videos:  # text 0, image 1, video 2
            inputs["mm_token_type_ids"] = (input_ids == QWEN_IMAGE_TOKEN).long() + 2 * (input_ids == QWEN_VIDEO_TOKEN).long()
    elif pixel_values:
        inputs[_image_keyword(model)] = torch.stack(pixel_values)
        if is_next or is_onevision:
            inputs["image_sizes"] = torch.tensor(sizes)
        if batch_num_images and is_onevision:
            inputs["batch_num_images"] = torch.tensor([layout.images for layout in samples if layout.images])
    if videos and (is_video_llava or is_onevision):
        inputs["pixel_values_videos"] = torch.stack(videos)
    return inputs


def _image_keyword(model) -> str:
    """Video-LLaVA took `pixel_values_images` before transformers 5.23, `pixel_values` since."""
    return "pixel_values" if "pixel_values" in inspect.signature(model.forward).parameters else "pixel_values_images"


def _anyres_token_count(model, patches: torch.Tensor, size: tuple[int, int], images: int | None = None) -> int:
    """Placeholders one LLaVA-NeXT image needs: the length of the features the model itself packs for it (for a
    OneVision image in a sample of `images` images, in the multi-image mode batch_num_images asks for)."""
    counts = {} if images is None else {"batch_num_images": torch.tensor([images])}
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=patches[None], image_sizes=torch.tensor([size]),
                                                  **counts)
    return len(getattr(features, "pooler_output", features)[0])
