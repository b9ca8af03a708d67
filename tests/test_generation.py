"""vtprune.eval.generation on the tiny model of every family with its stock processor: prompts come from the chat
template, and a batch (left-padded; images, several images, text alone, videos where the family takes them)
answers what each of its samples answers alone, pruned and unpruned."""

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers.processors import TemplateProcessing

import vtprune
from vtprune.eval.generation import (
    NoChatTemplate, batch_inputs, build_prompt, by_frame_count, generate_answers, generate_from, generate_tokens,
    load_checkpoint,
)
from vtprune.tiny import tiny_llava
from vtprune.tiny_processors import tiny_processor

from .conftest import FAMILIES, SUPPRESS

VIDEO_FAMILIES = {"qwen2_vl", "qwen2_5_vl", "video_llava", "llava_onevision"}
STEPS = 3


def image(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def video(frames, h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (frames, h, w, 3), dtype=np.uint8)


def chat_template(processor) -> str:
    """A LLaVA-style user/assistant template writing each item as the family's placeholder (the tiny processors
    ship none, as a checkpoint's processor would)."""
    qwen = "Qwen" in type(processor).__name__
    image_mark = "<|vision_start|><|image_pad|><|vision_end|>" if qwen else processor.image_token
    video_mark = "<|vision_start|><|video_pad|><|vision_end|>" if qwen else getattr(processor, "video_token", "")
    return ("{% for message in messages %}USER :{% for part in message['content'] %}"
            "{% if part['type'] == 'image' %} " + image_mark + "{% elif part['type'] == 'video' %} " + video_mark +
            "{% else %} {{ part['text'] }}{% endif %}{% endfor %}{% endfor %}"
            "{% if add_generation_prompt %} ASSISTANT :{% endif %}")


def templated(model):
    processor = tiny_processor(model)
    processor.chat_template = chat_template(processor)
    return processor


def samples(family):
    """(questions, images per sample, videos per sample): one image, two images of other sizes, text alone, and
    where the family takes videos, a video (Video-LLaVA and OneVision take one frame count per batch)."""
    questions = ["what colour is the cat ?", "how many shapes are there ?", "is there a dog near the tree"]
    images = [[image(40, 90, 1)], [image(90, 40, 2), image(56, 56, 3)], []]
    videos = [[], [], []]
    if family in VIDEO_FAMILIES:
        questions.append("what happens first ?")
        images.append([])
        videos.append([video(4, 40, 90, 4)])
    return questions, images, videos


@pytest.mark.parametrize("method", [None, "fastv"])
def test_a_batch_generates_what_each_sample_generates_alone(family, method):
    model = FAMILIES[family]("sdpa")
    processor = templated(model)
    questions, images, videos = samples(family)
    pruner = vtprune.apply(model, method, 8) if method else None
    try:
        batch = generate_tokens(model, processor, questions, images, STEPS, videos=videos, suppress_tokens=SUPPRESS)
        if pruner:  # the batch was pruned: every item's visual tokens counted, fewer kept
            stats = pruner.last_stats
            assert stats.images_per_sample == [len(i) + len(v) for i, v in zip(images, videos)]
            assert sum(stats.kept_per_sample) < sum(stats.visual_tokens_per_sample)
        alone = [generate_tokens(model, processor, [q], [i], STEPS, videos=[v], suppress_tokens=SUPPRESS)[0]
                 for q, i, v in zip(questions, images, videos)]
        answers = generate_answers(model, processor, questions, images, STEPS, videos=videos, suppress_tokens=SUPPRESS)
    finally:
        if pruner:
            pruner.remove()
    assert batch == alone
    assert all(len(tokens) == STEPS for tokens in batch)
    assert answers == [processor.decode(tokens, skip_special_tokens=True).strip() for tokens in alone]


def test_a_batch_is_grouped_by_its_videos_frame_counts():
    """Video-LLaVA's and OneVision's processors stack a batch's videos into one tensor: the lmms-eval plugin runs
    each frame count apart (samples without a video with the first)."""
    videos = [[video(4, 40, 90, 4)], [], [video(2, 40, 90, 5)], [video(4, 40, 90, 6)]]
    assert by_frame_count(videos) == [[0, 1, 3], [2]]
    assert by_frame_count([[], []]) == [[0, 1]]
    assert by_frame_count([[video(2, 40, 90, 4), video(3, 40, 90, 5)], []]) == [[0, 1]]


def test_the_prompt_comes_from_the_chat_template(family):
    processor = templated(FAMILIES[family]("sdpa"))
    prompt = build_prompt(processor, "what colour is the cat ?", images=2)
    mark = "<|image_pad|>" if "Qwen" in type(processor).__name__ else processor.image_token
    assert prompt.count(mark) == 2
    assert prompt.startswith("USER :") and prompt.endswith("what colour is the cat ? ASSISTANT :")
    assert prompt.index(mark) < prompt.index("what colour")  # the images come before the question
    # lmms-eval's <image> markers in a question are dropped: the template places the images
    assert build_prompt(processor, "<image>\nwhat colour is the cat ?", images=2) == prompt


def test_a_batch_is_padded_on_the_left_with_one_bos_and_visuals_in_lists_or_tuples():
    processor = templated(tiny_llava())
    processor.tokenizer.padding_side = "right"  # a checkpoint's tokenizer may pad on the right: generation appends
    pictures = (image(40, 90, 1), image(56, 56, 2))
    inputs = batch_inputs(processor, ["a", "what colour is the cat ?"], [[], pictures])
    mask = inputs["attention_mask"]
    assert mask[:, -1].all() and not mask[0, 0]
    assert torch.equal(inputs["input_ids"], batch_inputs(processor, ["a", "what colour is the cat ?"],
                                                         [[], list(pictures)])["input_ids"])
    # a tokenizer that adds a BOS, as LLaVA-1.5's does: one BOS a prompt, also where the template writes it itself
    tokenizer = processor.tokenizer
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single=f"{tokenizer.bos_token} $A", special_tokens=[(tokenizer.bos_token, tokenizer.bos_token_id)])
    for template in (processor.chat_template, tokenizer.bos_token + processor.chat_template):
        processor.chat_template = template
        inputs = batch_inputs(processor, ["a", "what colour is the cat ?"], [[], pictures])
        assert (inputs["input_ids"] == tokenizer.bos_token_id).sum(dim=1).tolist() == [1, 1]


def test_generation_is_greedy_with_the_pad_token_unless_the_caller_says_otherwise(monkeypatch):
    model = tiny_llava()
    processor = templated(model)
    inputs = batch_inputs(processor, ["a"], [[]])
    asked = []
    monkeypatch.setattr(model, "generate", lambda **kwargs: asked.append(kwargs) or kwargs["input_ids"])
    generate_from(model, processor, inputs, 2)
    generate_from(model, processor, inputs, 2, do_sample=True, num_beams=2)
    tokenizer = processor.tokenizer
    pad, tokenizer.pad_token = tokenizer.pad_token_id, None  # a tokenizer without one pads generation with its EOS
    generate_from(model, processor, inputs, 2)
    assert [(a["do_sample"], a["pad_token_id"], a.get("num_beams")) for a in asked] == [
        (False, pad, None), (True, pad, 2), (False, tokenizer.eos_token_id, None)]
    assert pad != tokenizer.eos_token_id


def test_a_given_template_overrides_the_processors_or_serves_one_without():
    given = "{{ messages[0]['content'][-1]['text'] }} ->"
    for processor in (templated(tiny_llava()), tiny_processor(tiny_llava())):
        assert build_prompt(processor, "is there a dog", chat_template=given) == "is there a dog ->"


def test_a_processor_without_a_chat_template_fails_naming_the_fix():
    model = tiny_llava()
    processor = tiny_processor(model)
    assert processor.chat_template is None
    with pytest.raises(NoChatTemplate, match="has no chat template.*chat_template.jinja.*processor.chat_template.*chat_template="):
        generate_answers(model, processor, ["is there a dog"], [[image(56, 56, 0)]], max_new_tokens=1)


def test_mismatched_sample_lists_fail():
    model = tiny_llava()
    with pytest.raises(ValueError, match="2 questions but 1 image lists"):
        generate_answers(model, templated(model), ["a", "b"], [[]], max_new_tokens=1)
    with pytest.raises(ValueError, match="2 questions but 2 image lists and 3 video lists"):
        generate_answers(model, templated(model), ["a", "b"], [[], []], max_new_tokens=1, videos=[[], [], []])


def test_a_saved_checkpoint_loads_with_its_template_and_answers_the_same(tmp_path):
    model = tiny_llava()
    processor = templated(model)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load_checkpoint(tmp_path)
    assert type(loaded) is type(model) and loaded_processor.chat_template == processor.chat_template
    question, images = ["what colour is the cat ?"], [[image(40, 90, 1)]]
    assert generate_tokens(loaded, loaded_processor, question, images, STEPS, suppress_tokens=SUPPRESS) == \
        generate_tokens(model, processor, question, images, STEPS, suppress_tokens=SUPPRESS)


def test_a_checkpoint_of_an_unsupported_family_is_refused_before_its_weights_load(tmp_path):
    from transformers import LlamaConfig, PaliGemmaConfig

    LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                num_attention_heads=1).save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="'llama' checkpoint.*vtprune supports"):
        load_checkpoint(tmp_path / "llama")
    PaliGemmaConfig().save_pretrained(tmp_path / "paligemma")  # image-text-to-text, but a family without an adapter
    with pytest.raises(ValueError, match=r"'paligemma' checkpoint \(PaliGemmaForConditionalGeneration\); vtprune "
                                         r"supports LlavaForConditionalGeneration"):
        load_checkpoint(tmp_path / "paligemma")
