"""Real architectures with random weights (speed does not depend on weight values), and small CPU shapes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    SiglipVisionConfig,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
)
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)


@dataclass(frozen=True)
class Preset:
    # "llava", "llava_next", "llava_onevision", "video_llava", "qwen2_vl" or "qwen2_5_vl" (the adapters' family names)
    family: str
    vision: dict
    text: dict
    image_patches: tuple[int, int] = (24, 24)  # Qwen2-VL / Qwen2.5-VL: patches per image before the 2x2 merge
    image_size: tuple[int, int] = (672, 672)  # LLaVA-NeXT / OneVision: the input image's (height, width) in pixels
    # LLaVA-NeXT's (and OneVision's) anyres resolutions (height, width), as its config lists them
    grid_pinpoints: tuple[tuple[int, int], ...] = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
    frames: int = 8  # Video-LLaVA: the frames of the one video each prompt carries
    aspect_ratio: str = "anyres_max_9"  # LLaVA-OneVision: its high-resolution grid holds at most N tiles' worth

    @property
    def videos(self) -> bool:
        """Its prompts carry a video (Video-LLaVA's: `preset_inputs`), not images."""
        return self.family == "video_llava"

    def config(self, attn_implementation: str = "sdpa"):
        """The model's config, without building the model (a 7B one takes a while)."""
        ids = dict(image_token_id=self.text["vocab_size"] - 1)
        if self.family == "video_llava":
            return VideoLlavaConfig(vision_config=CLIPVisionConfig(**self.vision), text_config=LlamaConfig(**self.text),
                                    **ids, video_token_id=self.text["vocab_size"] - 2, vision_feature_layer=-2,
                                    vision_feature_select_strategy="default", attn_implementation=attn_implementation)
        if self.family in ("llava", "llava_next"):
            common = dict(vision_config=CLIPVisionConfig(**self.vision), text_config=LlamaConfig(**self.text), **ids,
                          vision_feature_layer=-2, vision_feature_select_strategy="default",
                          attn_implementation=attn_implementation)
            if self.family == "llava":
                return LlavaConfig(**common)
            return LlavaNextConfig(**common, image_grid_pinpoints=[list(p) for p in self.grid_pinpoints])
        if self.family == "llava_onevision":  # SigLIP (no CLS token: every patch is a feature) and Qwen2
            return LlavaOnevisionConfig(
                vision_config=SiglipVisionConfig(**self.vision), text_config=Qwen2Config(**self.text), **ids,
                video_token_id=self.text["vocab_size"] - 2, vision_feature_layer=-1,
                vision_feature_select_strategy="full", vision_aspect_ratio=self.aspect_ratio,
                image_grid_pinpoints=[list(p) for p in self.grid_pinpoints], attn_implementation=attn_implementation)
        ids.update(vision_start_token_id=self.text["vocab_size"] - 2, vision_end_token_id=self.text["vocab_size"] - 3)
        config_class = Qwen2VLConfig if self.family == "qwen2_vl" else Qwen2_5_VLConfig
        return config_class(vision_config=self.vision, text_config=self.text, **ids,
                            attn_implementation=attn_implementation)

    def build(self, attn_implementation: str = "sdpa"):
        model_class = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration,
                       "llava_onevision": LlavaOnevisionForConditionalGeneration,
                       "video_llava": VideoLlavaForConditionalGeneration,
                       "qwen2_vl": Qwen2VLForConditionalGeneration,
                       "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}[self.family]
        return model_class(self.config(attn_implementation))


@dataclass(frozen=True)
class AnyresLayout:
    """One LLaVA-NeXT (or LLaVA-OneVision) image as the model packs it: the base grid, then the unpadded
    high-resolution grid (on OneVision, shrunk to at most anyres_max_N tiles' worth) with a newline token after
    each of its rows."""

    base: int  # tokens of the base image (side x side)
    rows: int  # high-resolution grid, unpadded to the image's aspect ratio
    cols: int
    tiles: int  # sequences the vision tower runs: the base image + the high-resolution tiles

    @property
    def visual(self) -> int:
        return self.base + self.rows * self.cols

    @property
    def newlines(self) -> int:
        return self.rows

    @property
    def placeholders(self) -> int:
        return self.visual + self.newlines


def anyres_layout(config, image_size: tuple[int, int]) -> AnyresLayout:
    """The packing of one image of image_size (height, width), from transformers' own anyres helpers."""
    tile, patch = config.vision_config.image_size, config.vision_config.patch_size
    side = tile // patch
    tiles_high, tiles_wide = get_anyres_image_grid_shape(list(image_size), config.image_grid_pinpoints, tile)
    rows, cols = unpad_image(torch.empty(1, tiles_high * side, tiles_wide * side), list(image_size)).shape[1:]
    aspect_ratio = getattr(config, "vision_aspect_ratio", None)
    if aspect_ratio is not None:  # OneVision's pack_image_features: shrink a grid of over 1.1^2 x N tiles' worth
        ratio = math.sqrt(rows * cols / (int(aspect_ratio.removeprefix("anyres_max_")) * side * side))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
    tiles = image_size_to_num_patches(list(image_size), config.image_grid_pinpoints, tile)
    return AnyresLayout(side * side, int(rows), int(cols), tiles)


CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768)
# Video-LLaVA's LanguageBind towers (image and video) are CLIP-L/14 at 224 px: 16x16 patches + CLS a frame.
CLIP_L_224 = dict(CLIP_L_336, image_size=224)
LLAMA_7B = dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
LLAMA_13B = dict(LLAMA_7B, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                 num_key_value_heads=40)
QWEN2_VL_VISION = dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
QWEN2_VL_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                   num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                   rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
# Qwen2.5-VL's tower: a SwiGLU MLP, attention in 112 px windows (8x8 patches) except in the full-attention blocks.
QWEN2_5_VL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                         window_size=112, fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu", patch_size=14,
                         spatial_merge_size=2, temporal_patch_size=2, in_channels=3, tokens_per_second=2)
QWEN2_5_VL_7B = dict(QWEN2_VL_7B, max_position_embeddings=128000)
# LLaVA-OneVision-7B: SigLIP-so400m/14 at 384 px (27x27 = 729 patches a tile, no CLS; its pooling head unused)
# and Qwen2-7B; anyres over 1x1 to 6x6 tiles of 384 px, at most 9 tiles' worth of high-resolution tokens.
SIGLIP_SO400M_384 = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                         image_size=384, patch_size=14, vision_use_head=False)
QWEN2_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
ONEVISION_PINPOINTS = tuple((384 * i, 384 * j) for i in range(1, 7) for j in range(1, 7))
# The narrow widths of the CPU presets: the tokens' geometry and the LM's depth of the real model.
CPU_LLAMA = dict(LLAMA_7B, vocab_size=1024, hidden_size=256, intermediate_size=688, num_attention_heads=4,
                 num_key_value_heads=4)
CPU_CLIP = dict(CLIP_L_336, hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                projection_dim=128)
# (bos/eos: the 7B's ids lie outside the small vocabulary; generation runs a fixed number of tokens anyway)
CPU_QWEN = dict(QWEN2_VL_7B, vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=28,
                num_attention_heads=4, num_key_value_heads=2, bos_token_id=None, eos_token_id=None,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]})
CPU_SIGLIP = dict(SIGLIP_SO400M_384, hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4)
CPU_QWEN2 = dict(QWEN2_7B, vocab_size=1024, hidden_size=256, intermediate_size=688, num_attention_heads=4,
                 num_key_value_heads=2, bos_token_id=None, eos_token_id=None)

PRESETS: dict[str, Preset] = {
    "llava-1.5-7b": Preset("llava", CLIP_L_336, LLAMA_7B),
    "llava-1.5-13b": Preset("llava", CLIP_L_336, LLAMA_13B),
    # A 672x672 image on LLaVA-NeXT: 5 CLIP tiles (base + 2x2), 576 + 48x48 = 2880 visual tokens and 48 newlines.
    "llava-next-7b": Preset("llava_next", CLIP_L_336, LLAMA_7B),
    # A 768x768 image on LLaVA-OneVision: 5 SigLIP tiles of 729 patches (base + 2x2; 4 tiles' worth is under
    # anyres_max_9, so no shrinking), 729 + 54x54 = 3645 visual tokens and 54 newlines.
    "llava-onevision-7b": Preset("llava_onevision", SIGLIP_SO400M_384, QWEN2_7B, image_size=(768, 768),
                                 grid_pinpoints=ONEVISION_PINPOINTS),
    # One 8-frame video on Video-LLaVA: 8 x 257 placeholders (each frame's CLS token, then its 16x16 patches);
    # 8 x 256 = 2048 visual tokens (the CLS tokens are never pruned nor counted).
    "video-llava-7b": Preset("video_llava", CLIP_L_224, LLAMA_7B),
    # 336x336 on Qwen2-VL: 24x24 patches, 144 visual tokens after the merge; (48, 48) gives LLaVA's 576.
    "qwen2-vl-7b": Preset("qwen2_vl", QWEN2_VL_VISION, QWEN2_VL_7B, image_patches=(48, 48)),
    "qwen2.5-vl-7b": Preset("qwen2_5_vl", QWEN2_5_VL_VISION, QWEN2_5_VL_7B, image_patches=(48, 48)),
    # CPU shapes: each family's visual tokens (576; 2880 for LLaVA-NeXT; 3645 for OneVision; 2048 in 8 frames for
    # Video-LLaVA) and LM depth, narrow widths.
    "llava-cpu-small": Preset("llava", CPU_CLIP, CPU_LLAMA),
    "llava-next-cpu-small": Preset("llava_next", CPU_CLIP, CPU_LLAMA),
    "llava-onevision-cpu-small": Preset("llava_onevision", CPU_SIGLIP, CPU_QWEN2, image_size=(768, 768),
                                        grid_pinpoints=ONEVISION_PINPOINTS),
    "video-llava-cpu-small": Preset("video_llava", dict(CPU_CLIP, image_size=224), CPU_LLAMA),
    "qwen2-vl-cpu-small": Preset("qwen2_vl", dict(QWEN2_VL_VISION, depth=2, embed_dim=64, hidden_size=256, num_heads=4),
                                 CPU_QWEN, image_patches=(48, 48)),
    # 4 tower blocks: three windowed, the last one full, as each group of 8 is on the 7B.
    "qwen2.5-vl-cpu-small": Preset("qwen2_5_vl", dict(QWEN2_5_VL_VISION, depth=4, hidden_size=64, intermediate_size=128,
                                                      num_heads=4, out_hidden_size=256, fullatt_block_indexes=[3]),
                                   CPU_QWEN, image_patches=(48, 48)),
}


def build_preset(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    with torch.device(device):
        model = PRESETS[name].build(attn_implementation)
    return model.to(dtype).eval()


def checkpoint_preset(model) -> Preset:
    """A checkpoint's own shapes, prompted as the 7B presets of its family are (`vtprune bench --model`): one image
    a prompt (LLaVA-NeXT: 672x672; OneVision: 768x768; Qwen2-VL and Qwen2.5-VL: 48x48 patches, 576 tokens), or
    one 8-frame video (Video-LLaVA)."""
    from vtprune.adapters import adapter_for

    family = adapter_for(model).family
    like = next(preset for name, preset in PRESETS.items() if preset.family == family and name.endswith("-7b"))
    return Preset(family, vision={}, text={}, image_patches=like.image_patches, image_size=like.image_size,
                  frames=like.frames)


def _plain_tokens(config) -> torch.Tensor:
    """The ids a prompt's text is drawn from: 1 up to the vocabulary's last 8 (where the presets put their special
    tokens), less every special token the config names (bos/eos/pad, image, video, vision start/end): a real
    checkpoint's lie inside its vocabulary."""
    special = [value for part in (config, config.text_config) for key, value in vars(part).items()
               if key.endswith(("token_id", "token_index")) and isinstance(value, int)]
    plain = torch.ones(config.text_config.vocab_size - 8, dtype=torch.bool)
    plain[0] = False
    plain[[i for i in special if 0 <= i < len(plain)]] = False
    return plain.nonzero().squeeze(1)


def preset_inputs(model, preset: Preset, batch: int, text_tokens: int = 40, device: str = "cpu", dtype=torch.float32):
    """A batch of prompts with one image each (Video-LLaVA: one video), as the model's processor would lay them out."""
    generator = torch.Generator().manual_seed(0)
    plain = _plain_tokens(model.config)
    text = plain[torch.randint(len(plain), (batch, text_tokens), generator=generator)]
    image_id = model.config.image_token_id
    if preset.family == "llava":
        side = model.config.vision_config.image_size // model.config.vision_config.patch_size
        visual = torch.full((batch, side * side), image_id)
        input_ids = torch.cat([text[:, :5], visual, text[:, 5:]], dim=1)
        size = model.config.vision_config.image_size
        pixel_values = torch.randn(batch, 3, size, size, generator=generator)
        inputs = {"input_ids": input_ids, "pixel_values": pixel_values.to(dtype)}
    elif preset.family == "video_llava":  # each frame: its CLS token, then its side x side patches
        size = model.config.vision_config.image_size
        side = size // model.config.vision_config.patch_size
        visual = torch.full((batch, preset.frames * (side * side + 1)), model.config.video_token_id)
        input_ids = torch.cat([text[:, :5], visual, text[:, 5:]], dim=1)
        pixel_values_videos = torch.randn(batch, preset.frames, 3, size, size, generator=generator)
        inputs = {"input_ids": input_ids, "pixel_values_videos": pixel_values_videos.to(dtype)}
    elif preset.family in ("llava_next", "llava_onevision"):
        layout = anyres_layout(model.config, preset.image_size)
        visual = torch.full((batch, layout.placeholders), image_id)
        input_ids = torch.cat([text[:, :5], visual, text[:, 5:]], dim=1)
        size = model.config.vision_config.image_size
        pixel_values = torch.randn(batch, layout.tiles, 3, size, size, generator=generator)
        inputs = {"input_ids": input_ids, "pixel_values": pixel_values.to(dtype),
                  "image_sizes": torch.tensor([list(preset.image_size)] * batch)}
    else:
        h, w = preset.image_patches
        start, end = model.config.vision_start_token_id, model.config.vision_end_token_id
        visual = torch.cat([torch.full((batch, 1), start), torch.full((batch, h * w // 4), image_id),
                            torch.full((batch, 1), end)], dim=1)
        input_ids = torch.cat([text[:, :5], visual, text[:, 5:]], dim=1)
        patch = 3 * 2 * 14 * 14
        inputs = {"input_ids": input_ids, "pixel_values": torch.randn(batch * h * w, patch, generator=generator).to(dtype),
                  "image_grid_thw": torch.tensor([[1, h, w]] * batch),
                  "mm_token_type_ids": (input_ids == image_id).long()}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    return {k: v.to(device) for k, v in inputs.items()}
