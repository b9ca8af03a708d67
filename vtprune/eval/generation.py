"""Answers from any supported checkpoint: prompts from its processor's chat template, batched generation.

`vtprune eval --model PATH --tasks ...` and the lmms-eval plugin both answer through here, so a question
reaches a model the same way whichever harness asks it:

    model, processor = load_checkpoint(path)
    with vtprune.apply(model, "clse", 64):
        answers = generate_answers(model, processor, ["is there a dog ?"], [[photo]], max_new_tokens=8)

A sample is a question and its visuals: a list of images (none, one or several) and, where the family takes
videos, a list of videos (each an array of frames or a list of frame images). Its prompt is the user turn
[image..., video..., question] through the processor's chat template, so each checkpoint is asked the way it
was trained to be asked. A batch is padded on the left (generation appends on the right) and decoded greedily
unless the caller asks for sampling or beams (the lmms-eval plugin, as a task sets them).
"""

from __future__ import annotations

from pathlib import Path

import torch

NO_TEMPLATE_FIX = (
    "give one: save it beside the processor's files (chat_template.jinja) as the family's hub checkpoints do (what "
    "`vtprune eval` reads), set processor.chat_template, or pass chat_template= (build_prompt; the lmms-eval "
    "plugin's model_args take a Jinja file)"
)


class NoChatTemplate(ValueError):
    """The processor has no chat template, so there is no way to know how this checkpoint is prompted."""


def load_checkpoint(path: str | Path, dtype="auto", attn_implementation: str = "sdpa"):
    """(model, processor) of a checkpoint folder of any family vtprune supports, the model in eval mode
    (`load_model`)."""
    from vtprune.synth.reference import load_processor

    return load_model(path, dtype, attn_implementation), load_processor(path)


def load_model(path: str | Path, dtype="auto", attn_implementation: str = "sdpa"):
    """The model of a checkpoint folder of any family vtprune supports, in eval mode.

    The model class is the one transformers maps the checkpoint to for image-text-to-text, checked against
    the families vtprune has adapters for before any weight is read. dtype "auto" keeps the checkpoint's own.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    from vtprune.adapters import supported_models
    from vtprune.synth.reference import load_whole

    config = AutoConfig.from_pretrained(path)
    model_class = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(config.model_type)
    if model_class not in supported_models():
        found = model_class or "no image-text-to-text class"
        raise ValueError(f"{path} is a {config.model_type!r} checkpoint ({found}); vtprune supports "
                         f"{', '.join(supported_models())}")
    model = load_whole(path, AutoModelForImageTextToText, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval()


IMAGE_MARKER = "<image>"  # lmms-eval's image placeholder, which some tasks write into the question


def conversation(question: str, images: int = 0, videos: int = 0) -> list[dict]:
    """One user turn: its images, then its videos, then the question (the order LLaVA and Qwen are trained on),
    less lmms-eval's `<image>` markers: the chat template places the images. (lmms-eval's llava_hf keeps a
    question's markers where they stand; its Qwen models drop them, as here. The hub LLaVA templates render
    every image first whatever the content's order, so markers could not place them through a template.)"""
    question = question.replace(IMAGE_MARKER, "").strip()
    content = [{"type": "image"}] * images + [{"type": "video"}] * videos + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


def check_chat_template(processor, chat_template: str | None = None) -> None:
    if chat_template is None and processor.chat_template is None:
        raise NoChatTemplate(f"{type(processor).__name__} has no chat template, so vtprune cannot tell how this "
                             f"checkpoint is prompted; {NO_TEMPLATE_FIX}")


def build_prompt(processor, question: str, images: int = 0, videos: int = 0, chat_template: str | None = None) -> str:
    """The prompt text for one sample, ending where the assistant's answer begins; `chat_template` overrides the
    processor's. The processor expands each placeholder the template writes into the item's visual tokens."""
    check_chat_template(processor, chat_template)
    return processor.apply_chat_template(conversation(question, images, videos), chat_template=chat_template,
                                         add_generation_prompt=True, tokenize=False)


def batch_inputs(processor, questions: list[str], images: list, videos: list | None = None,
                 chat_template: str | None = None):
    """The processor's tensors for a batch, padded on the left. images[i] (and videos[i]) are sample i's: a
    list, possibly empty, or a single image; a batch may mix samples with and without visuals."""
    images = [_as_list(sample) for sample in images]
    videos = [_as_list(sample) for sample in videos] if videos is not None else [[] for _ in questions]
    if not len(questions) == len(images) == len(videos):
        raise ValueError(f"{len(questions)} questions but {len(images)} image lists and {len(videos)} video lists")
    prompts = [build_prompt(processor, q, len(i), len(v), chat_template) for q, i, v in zip(questions, images, videos)]
    bos = processor.tokenizer.bos_token
    flat_videos = [video for sample in videos for video in sample]
    return processor(
        text=prompts,
        images=images if any(images) else None,  # per sample: the processor matches them to its placeholders
        videos=flat_videos or None,  # in prompt order, as each family's processor takes them
        padding=True, padding_side="left", return_tensors="pt",
        # a template that writes the BOS itself must not get a second one (transformers' own rule)
        add_special_tokens=not (bos and prompts[0].startswith(bos)),
    )


def generate_tokens(model, processor, questions: list[str], images: list, max_new_tokens: int,
                    videos: list | None = None, chat_template: str | None = None, **generate_kwargs) -> list[list[int]]:
    """Each sample's generated token ids, prompt and padding left out (a sample that stops early keeps the pad
    ids that filled its row): greedy unless generate_kwargs (to `model.generate`: do_sample, num_beams,
    suppress_tokens, ...) say otherwise. Video-LLaVA's and OneVision's processors stack a batch's videos into
    one tensor: give them a batch whose videos have one frame count (`by_frame_count`)."""
    inputs = batch_inputs(processor, questions, images, videos, chat_template)
    return generate_from(model, processor, on_model(model, inputs), max_new_tokens, **generate_kwargs)


def on_model(model, inputs):
    """The processor's inputs moved to the model's device, their floating tensors (pixels) to its dtype."""
    return inputs.to(model.device, dtype=model.dtype)


def generate_from(model, processor, inputs, max_new_tokens: int, **generate_kwargs) -> list[list[int]]:
    """`generate_tokens` from a batch's inputs on the model (`on_model(model, batch_inputs(...))`, or features the
    tower encoded ahead as mm_encoder_outputs in place of the pixels), which it leaves as they were: a batch
    processed once may be answered again, e.g. under another pruner."""
    pad = processor.tokenizer.pad_token_id
    settings = {"do_sample": False, "pad_token_id": pad if pad is not None else processor.tokenizer.eos_token_id}
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, **{**settings, **generate_kwargs})
    return out[:, inputs["input_ids"].shape[1]:].tolist()


def generate_answers(model, processor, questions: list[str], images: list, max_new_tokens: int,
                     videos: list | None = None, chat_template: str | None = None, stop=(),
                     **generate_kwargs) -> list[str]:
    """Each sample's answer: its generated tokens decoded without special tokens, up to the first of the `stop`
    strings (the task's "until"), stripped. A pruner applied to `model` (vtprune.apply) prunes every sample of
    the batch; its last_stats describe this call."""
    tokens = generate_tokens(model, processor, questions, images, max_new_tokens, videos, chat_template,
                             **generate_kwargs)
    return decode_answers(processor, tokens, stop)


def decode_answers(processor, tokens: list[list[int]], stop=()) -> list[str]:
    """Generated tokens as answers: decoded without special tokens, cut at the first stop string (`cut_at_stops`)."""
    return [cut_at_stops(text, stop) for text in processor.batch_decode(tokens, skip_special_tokens=True)]


VIDEO_FAMILIES = "Video-LLaVA, Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision"


def check_takes_videos(processor, tasks) -> None:
    """Refuse video questions (of `tasks`, named) for a checkpoint whose processor drops videos: it would answer
    from the question alone, pruned as unpruned."""
    if tasks and getattr(processor, "video_processor", None) is None:
        raise ValueError(f"{', '.join(sorted(tasks))} asks about videos, but this checkpoint's processor "
                         f"({type(processor).__name__}) takes none; use a family that does ({VIDEO_FAMILIES})")


def by_frame_count(videos: list) -> list[list[int]]:
    """The batch's samples (indices) grouped by their videos' frame counts, in order; samples without a video
    join the first group. One group when the counts agree."""
    counts = [tuple(len(video) for video in _as_list(sample)) for sample in videos]
    distinct = list(dict.fromkeys(c for c in counts if c)) or [()]
    return [[i for i, c in enumerate(counts) if c == key or (not c and key == distinct[0])] for key in distinct]


def cut_at_stops(answer: str, stop) -> str:
    """The answer, stripped, up to the first of the stop strings (a string or several; decoding ran on to
    max_new_tokens or EOS), stripped again, as lmms-eval's models cut at a task's "until" (so a leading "\n\n"
    does not cut an answer to nothing)."""
    answer = answer.strip()
    for s in [stop] if isinstance(stop, str) else stop or []:
        if s:
            answer = answer.split(s)[0]
    return answer.strip()


def _as_list(visuals) -> list:
    if visuals is None:
        return []
    return list(visuals) if isinstance(visuals, (list, tuple)) else [visuals]
