"""The reference model: LLaVA-1.5's architecture in miniature, trained by `train.py` on the synthetic benchmark.

A CLIP vision tower at 336 px with patch 14 (576 visual tokens per image, as
LLaVA-1.5), a 2-layer MLP projector, a Llama LM, a word-level tokenizer and a
LlavaProcessor, all saved in HF format: `LlavaForConditionalGeneration.from_pretrained`
loads it like any LLaVA checkpoint on disk.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from .generator import SIZE, vocabulary

REFERENCE_DIR = Path(__file__).resolve().parent.parent / "reference_model"
PATCH = 14
GRID = SIZE // PATCH  # 24: 576 visual tokens
IMAGE_TOKEN = "<image>"
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN]
TEMPLATE_WORDS = ["user", ":", "assistant"]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Seeds of the synthetic data: each use has its own, so that no evaluation sees a training image.
TRAIN_SEED, VALIDATION_SEED, EVAL_SEED, TEST_SEED, CALIBRATION_SEED, RESULTS_SEED = 0, 1, 2, 3, 4, 5


def prompt(question: str) -> str:
    """LLaVA-1.5's conversation format with the question before the image; the answer is the next word.

    Question first, so that each visual token can already see what is asked (causal
    attention) and work out locally whether it matters: a small LM trained from scratch
    learns that far sooner than a question-to-image lookup (an image-first run sat at the
    text-only prior for 750 steps; benchmarks/reference_training/README.md).
    """
    return f"USER: {question}\n{IMAGE_TOKEN} ASSISTANT:"


# `prompt` as a chat template, so that generic harnesses (vtprune eval --tasks, the lmms-eval plugin) ask the
# reference model as it was trained: the user's text, then the image(s), then the assistant's turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}USER: "
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}{{ '\\n' }}"
    "{% for part in message['content'] if part['type'] == 'image' %}" + IMAGE_TOKEN + "{% endfor %}"
    "{% endfor %} ASSISTANT:"
)


def prompt_image_first(question: str) -> str:
    """LLaVA-1.5's own conversation format, the image before the question: the deep reference model's prompt.

    Here no visual token can see the question, so the lookup of what is asked happens at the
    question's and the answer's positions, as in a real LLaVA-1.5.
    """
    return f"USER: {IMAGE_TOKEN}\n{question} ASSISTANT:"


# `prompt_image_first` as a chat template: the image(s), then the user's text, then the assistant's turn.
IMAGE_FIRST_CHAT_TEMPLATE = (
    "{% for message in messages %}USER: "
    "{% for part in message['content'] if part['type'] == 'image' %}" + IMAGE_TOKEN + "{% endfor %}{{ '\\n' }}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}"
    "{% endfor %} ASSISTANT:"
)


def prompt_for(processor):
    """How a checkpoint is asked about one image: through the chat template saved beside it, as `vtprune eval
    --tasks` asks it (the shipped model's writes its training prompt, question first; the deep model's, image
    first), or, for a checkpoint saved without one, as the shipped model was trained."""
    if processor.chat_template is None:
        return prompt
    from vtprune.eval.generation import build_prompt

    return functools.partial(build_prompt, processor, images=1)


def image_tokens(processor, prompt) -> int:
    """The visual tokens a LLaVA checkpoint gives an image (one grid, whatever the image's size): what its
    processor expands the placeholder of a blank image to."""
    from PIL import Image

    ids = processor(images=[Image.new("RGB", (SIZE, SIZE))], text=[prompt("?")], return_tensors="pt")["input_ids"]
    return int((ids == processor.image_token_id).sum())


@dataclass(frozen=True)
class Depth:
    """A reference architecture: the LM's and the vision tower's layer counts, and the prompt it is trained with."""

    lm_layers: int
    vision_layers: int
    image_first: bool

    @property
    def prompt(self):
        return prompt_image_first if self.image_first else prompt


# "shipped": vtprune/reference_model. "deep" (issue 18): the widths of the shipped model, so that it
# starts from the shipped model's layers (upscale.py), with as many layers as fit 16 MiB in float32:
# 4.05M parameters, 16.2 MB; a 17th LM layer would make it 17.0 MB.
DEPTHS = {"shipped": Depth(lm_layers=6, vision_layers=3, image_first=False),
          "deep": Depth(lm_layers=16, vision_layers=6, image_first=True)}


def build_tokenizer() -> PreTrainedTokenizerFast:
    words = SPECIAL + TEMPLATE_WORDS + [w for w in vocabulary() if w not in TEMPLATE_WORDS]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation runs
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens={"image_token": IMAGE_TOKEN}, padding_side="left",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tokenizer


def build_processor(tokenizer: PreTrainedTokenizerFast, image_first: bool = False) -> LlavaProcessor:
    image_processor = CLIPImageProcessorPil(  # the PIL backend: no torchvision here
        size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, image_token=IMAGE_TOKEN,
        chat_template=IMAGE_FIRST_CHAT_TEMPLATE if image_first else CHAT_TEMPLATE,
    )


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0, depth: Depth = DEPTHS["shipped"]
                ) -> LlavaForConditionalGeneration:
    """A fresh, randomly initialised reference model (shipped depth: about 1.7M parameters, 7 MB in float32)."""
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=96, intermediate_size=384, num_hidden_layers=depth.vision_layers, num_attention_heads=3,
            image_size=SIZE, patch_size=PATCH, projection_dim=96,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=128, intermediate_size=352, num_hidden_layers=depth.lm_layers,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        # A tower trained from scratch has no reason to leave its last layer unused, so the
        # projector reads it (LLaVA-1.5 reads the penultimate layer of a pretrained CLIP).
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        attn_implementation="sdpa",
    )
    model = LlavaForConditionalGeneration(config)
    # Word embeddings start at unit scale, as large as the visual features the projector learns
    # to emit: at Llama's default 0.02 the question was ~1% of a visual token's residual stream,
    # and the LM learned to ignore the image.
    torch.nn.init.normal_(model.get_input_embeddings().weight, std=1.0)
    return model


def pixel_values(images) -> torch.Tensor:
    """What the processor makes of 336x336 RGB images (resize and crop are no-ops), without its per-call overhead."""
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images]) / 255.0
    array = (array - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


class CheckpointError(ValueError):
    """Not a LLaVA checkpoint whose config.json describes its weights: loading it would leave parts of it random."""


def _preview(keys, shown: int = 3) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys)} in all)" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def read_config(path: Path, accept: tuple[str, ...] = (LlavaConfig.model_type,)) -> dict:
    """A checkpoint's config.json declaring one of the model types `accept` (LLaVA's), or CheckpointError saying why
    the folder holds none."""
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(f"no config.json in {path}: not a checkpoint folder")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{file} is not valid JSON ({error})") from None
    declared = config.get("model_type") if isinstance(config, dict) else None
    if declared not in accept:
        if accept == (LlavaConfig.model_type,):
            raise CheckpointError(f"{file} declares model_type {declared!r}; "
                                  f"vtprune loads LLaVA checkpoints (model_type {LlavaConfig.model_type!r})")
        raise CheckpointError(f"{file} declares model_type {declared!r}, not one of {', '.join(map(repr, accept))}")
    return config


def load_llava(path: str | Path, **kwargs) -> LlavaForConditionalGeneration:
    """A LLaVA checkpoint, loaded whole (load_whole), once its config.json says it is one."""
    read_config(Path(path))
    return load_whole(path, LlavaForConditionalGeneration, **kwargs)


def load_whole(path: str | Path, model_class, **kwargs):
    """model_class.from_pretrained, refusing a checkpoint that does not load whole.

    transformers only logs weights it found no place for (or places it found no weights for)
    and fills the gaps with random values; here any such key is an error that names them.
    """
    path = Path(path)
    try:
        # Mismatched shapes are reported with the other problems below instead of raised without their names.
        model, info = model_class.from_pretrained(path, output_loading_info=True, ignore_mismatched_sizes=True,
                                                  **kwargs)
    except (OSError, SafetensorError) as error:  # no weights file, a truncated one
        raise CheckpointError(f"{path}: cannot read the checkpoint's weights ({error})") from None
    problems = []
    if info["missing_keys"]:
        problems.append(f"{len(info['missing_keys'])} weights the config declares are missing: "
                        f"{_preview(info['missing_keys'])}")
    if info["unexpected_keys"]:
        problems.append(f"{len(info['unexpected_keys'])} stored weights the config has no place for: "
                        f"{_preview(info['unexpected_keys'])}")
    if info["mismatched_keys"]:
        shapes = [f"{key} {tuple(stored)} vs {tuple(declared)}" for key, stored, declared in info["mismatched_keys"]]
        problems.append(f"{len(shapes)} weights of another shape than the config's (stored vs declared): "
                        f"{_preview(shapes)}")
    if problems:
        raise CheckpointError(f"{path} does not match its config.json: {'; '.join(problems)}")
    return model


def load_reference(path: str | Path = REFERENCE_DIR, attn_implementation: str = "sdpa"):
    """The shipped (or any saved) reference model and its processor, through the standard HF loaders."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no reference model at {path}; train one with `vtprune train-reference --out {path}`")
    model = load_llava(path, attn_implementation=attn_implementation, dtype=torch.float32)
    return model.eval(), load_processor(path, LlavaProcessor)


def load_processor(path: Path, loader=None):
    """The processor saved beside a checkpoint (loader: a processor class, AutoProcessor by default), or
    CheckpointError saying how to give it one."""
    from transformers import AutoProcessor

    try:
        return (loader or AutoProcessor).from_pretrained(path)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}: cannot load the checkpoint's processor ({error}); save it beside the model "
                              "(processor.save_pretrained)") from None
    except ImportError as error:  # Qwen2-VL's, Video-LLaVA's and OneVision's video processors need torchvision
        raise CheckpointError(f"{path}: the checkpoint's processor needs a package this environment lacks ({error}); "
                              "install it (torchvision: the build matching your torch)") from None
