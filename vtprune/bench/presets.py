"""Real architectures with random weights (speed does not depend on weight values), and small CPU shapes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)


@dataclass(frozen=True)
class Preset:
    family: str  # "llava" or "qwen2_vl"
    vision: dict
    text: dict
    image_patches: tuple[int, int] = (24, 24)  # Qwen2-VL: patches per image before the 2x2 merge

    def build(self, attn_implementation: str = "sdpa"):
        if self.family == "llava":
            config = LlavaConfig(
                vision_config=CLIPVisionConfig(**self.vision), text_config=LlamaConfig(**self.text),
                image_token_id=self.text["vocab_size"] - 1, vision_feature_layer=-2,
                vision_feature_select_strategy="default", attn_implementation=attn_implementation,
            )
            return LlavaForConditionalGeneration(config)
        config = Qwen2VLConfig(vision_config=self.vision, text_config=self.text, image_token_id=self.text["vocab_size"] - 1,
                               vision_start_token_id=self.text["vocab_size"] - 2,
                               vision_end_token_id=self.text["vocab_size"] - 3, attn_implementation=attn_implementation)
        return Qwen2VLForConditionalGeneration(config)


CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768)
LLAMA_7B = dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
LLAMA_13B = dict(LLAMA_7B, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                 num_key_value_heads=40)
QWEN2_VL_VISION = dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
QWEN2_VL_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                   num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                   rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})

PRESETS: dict[str, Preset] = {
    "llava-1.5-7b": Preset("llava", CLIP_L_336, LLAMA_7B),
    "llava-1.5-13b": Preset("llava", CLIP_L_336, LLAMA_13B),
    # 336x336 on Qwen2-VL: 24x24 patches, 144 visual tokens after the merge; (48, 48) gives LLaVA's 576.
    "qwen2-vl-7b": Preset("qwen2_vl", QWEN2_VL_VISION, QWEN2_VL_7B, image_patches=(48, 48)),
    # CPU shapes: LLaVA-1.5's 576 visual tokens and 32 layers, narrow widths.
    "llava-cpu-small": Preset("llava", dict(CLIP_L_336, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                                            num_attention_heads=4, projection_dim=128),
                              dict(LLAMA_7B, vocab_size=1024, hidden_size=256, intermediate_size=688, num_attention_heads=4,
                                   num_key_value_heads=4)),
    "qwen2-vl-cpu-small": Preset("qwen2_vl", dict(QWEN2_VL_VISION, depth=2, embed_dim=64, hidden_size=256, num_heads=4),
                                 dict(QWEN2_VL_7B, vocab_size=1024, hidden_size=256, intermediate_size=688,
                                      num_hidden_layers=28, num_attention_heads=4, num_key_value_heads=2,
                                      rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]}),
                                 image_patches=(48, 48)),
}


def build_preset(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    with torch.device(device):
        model = PRESETS[name].build(attn_implementation)
    return model.to(dtype).eval()


def preset_inputs(model, preset: Preset, batch: int, text_tokens: int = 40, device: str = "cpu", dtype=torch.float32):
    """A batch of prompts with one image each, as the model's processor would lay them out."""
    vocab = model.config.text_config.vocab_size
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(1, vocab - 8, (batch, text_tokens), generator=generator)
    image_id = model.config.image_token_id
    if preset.family == "llava":
        side = model.config.vision_config.image_size // model.config.vision_config.patch_size
        visual = torch.full((batch, side * side), image_id)
        input_ids = torch.cat([text[:, :5], visual, text[:, 5:]], dim=1)
        size = model.config.vision_config.image_size
        pixel_values = torch.randn(batch, 3, size, size, generator=generator)
        inputs = {"input_ids": input_ids, "pixel_values": pixel_values.to(dtype)}
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
