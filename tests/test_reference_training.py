"""The training recipe of the reference model: rows match evaluation prompts, derived questions and auxiliary losses are right."""

import json

import numpy as np
import pytest
import torch
from transformers import LlavaProcessor

from vtprune.synth import make_sample, make_text
from vtprune.synth import vocabulary as synth_vocabulary
from vtprune.synth.generator import ANSWERS, words
from vtprune.synth.questions import derived_questions
from vtprune.synth.curves import plot_training_logs
from vtprune.synth import handoff
from vtprune.synth.reference import (
    DEPTHS,
    REFERENCE_DIR,
    CheckpointError,
    build_model,
    build_processor,
    build_tokenizer,
    load_llava,
    load_reference,
    pixel_values,
    prompt,
    prompt_for,
    prompt_image_first,
)
from vtprune.synth.train import (
    capture_layer_input,
    caption,
    covered_patches,
    encode_training,
    grounding_loss,
    learning_rate_factor,
    patch_labels,
    reading_loss,
    train,
    TrainingBatches,
)
from vtprune.synth.upscale import OUTPUT_PROJECTIONS, layer_sources, upscale_into


def training_items(samples, extra=2):
    """Each sample's own question (with its caption) and a few derived ones, with their boxes."""
    items, images = [], []
    for i, s in enumerate(samples):
        asked = [(s.question, s.answer, caption(s.meta), tuple(s.meta["relevant"]))]
        asked += [(q, a, None, boxes) for q, a, _, boxes in derived_questions(s.meta, np.random.default_rng(i), extra)]
        items += asked
        images += [s.image] * len(asked)
    return items, images


@pytest.mark.parametrize("prompt_format", [prompt, prompt_image_first])
def test_training_rows_are_evaluation_prompts_followed_by_their_targets(prompt_format):
    tokenizer = build_tokenizer()
    samples = [make_sample(0, i) for i in range(2)]
    items, _ = training_items(samples)
    batch = encode_training(tokenizer, items, prompt_format)
    processor = build_processor(tokenizer, image_first=prompt_format is prompt_image_first)
    prompts = processor(images=[samples[0].image] * len(items), text=[prompt_format(q) for q, *_ in items],
                        return_tensors="pt", padding=True)["input_ids"]
    for r, (question, answer, text, boxes) in enumerate(items):
        ids = batch["input_ids"][r][batch["attention_mask"][r].bool()].tolist()
        prompt_ids = prompts[r][prompts[r] != tokenizer.pad_token_id].tolist()
        assert ids[: len(prompt_ids)] == prompt_ids  # what the model is asked at evaluation
        query = int(batch["query_positions"][r])
        assert tokenizer.convert_ids_to_tokens(int(batch["answer_targets"][r, query + 1])) == answer
        assert (batch["answer_targets"][r] != -100).sum() == 1
        caption_words = tokenizer.convert_ids_to_tokens(batch["caption_targets"][r][batch["caption_targets"][r] != -100])
        assert caption_words == (text.split() if text else [])
        # relevant tokens are visual tokens, as many as the boxes cover
        assert not (batch["relevant"][r] & ~batch["visual"][r]).any()
        assert int(batch["relevant"][r].sum()) == int(np.any([covered_patches(b) for b in boxes], axis=0).sum()
                                                        if boxes else 0)
        assert batch["key_mask"][r].sum() == len(prompt_ids)  # the answer's predictor sees the whole prompt only
        assert tokenizer.convert_ids_to_tokens(batch["input_ids"][r][batch["question"][r]]) == question.split()
        visual_at = torch.nonzero(batch["visual"][r]).flatten()
        question_at = torch.nonzero(batch["question"][r]).flatten()
        assert (question_at[0] > visual_at[-1]) == (prompt_format is prompt_image_first)


def test_derived_questions_agree_with_the_generator():
    """Whenever a derived question is the scene's own question, it has the scene's answer."""
    agreed, vocabulary = 0, set(synth_vocabulary())
    for i in range(300):
        sample = make_text(0, i)
        derived = derived_questions(sample.meta, np.random.default_rng(i), 100)
        assert len(derived) == len(set(derived))
        for question, answer, qclass, boxes in derived:
            assert boxes or (qclass == "existence" and answer == "no")
            assert answer in ANSWERS[qclass]
            assert set(words(question)) <= vocabulary
            if question == sample.question:
                assert answer == sample.answer, (question, answer, sample.answer)
                agreed += 1
    assert agreed >= 100  # the check above did run on many scenes


def test_derived_questions_read_the_scene():
    meta = {"plates": [{"color": "red", "word": "cat", "box": (10, 10, 80, 50)}],
            "objects": [{"shape": "circle", "color": "blue", "box": (200, 20, 230, 50)},
                        {"shape": "star", "color": "green", "box": (200, 200, 230, 230)},
                        {"shape": "star", "color": "green", "box": (100, 280, 130, 310)}]}
    derived = {q: a for q, a, *_ in derived_questions(meta, np.random.default_rng(0), 100)}
    assert derived["what word is written on the red plate ?"] == "cat"
    assert derived["what color is the circle ?"] == "blue"
    assert "what color is the star ?" not in derived  # two stars: ambiguous
    assert derived["what shape is the blue object ?"] == "circle"
    assert derived["how many green stars are there ?"] == "2"
    existence = {tuple(q.split()[3:5]): a for q, a in derived.items() if q.startswith("is there")}
    assert sorted(existence.values()) == ["no", "yes"]
    for (color, shape), answer in existence.items():
        assert answer == ("yes" if (color, shape) in {("blue", "circle"), ("green", "star")} else "no")
    assert "which half of the image has the most objects ?" not in derived  # plates: no scene questions


def test_patch_labels_mark_one_centre_per_object():
    sample = make_text(0, 1)
    labels = patch_labels(sample.meta)
    assert labels.shape == (4, 24, 24)
    assert labels[3].sum() == len(sample.meta["objects"]) + len(sample.meta["plates"])


def test_attention_losses_are_the_attention_mass_of_one_head_on_what_it_should_see():
    """Grounding (answer position -> the question's boxes, last layer) and reading (visual tokens -> the
    question's words, first layer), against the weights eager attention reports."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer).eval()
    items, images = training_items([make_sample(0, i) for i in range(2)])
    batch = encode_training(tokenizer, items)
    layers = model.model.language_model.layers
    captured = {}
    capture_layer_input(layers[0], captured, "first")
    capture_layer_input(layers[-1], captured, "last")
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=pixel_values(images))
    with torch.no_grad():
        model(**inputs)
        grounding = grounding_loss(layers[-1], *captured["last"], batch)
        reading = reading_loss(layers[0], *captured["first"], batch)
        model.set_attn_implementation("eager")
        weights = model(output_attentions=True, **inputs).attentions
    rows = torch.arange(len(items))
    at_answer = weights[-1][rows, 0, batch["query_positions"]]
    mass = (at_answer * batch["relevant"]).sum(dim=1)
    has = batch["relevant"].any(dim=1)
    assert has.sum() >= 4
    torch.testing.assert_close(grounding, -mass[has].log().mean(), rtol=1e-4, atol=1e-5)
    at_visual = weights[0][:, 0][batch["visual"]].view(len(items), -1, batch["visual"].shape[1])  # [N, 576, T]
    mass = (at_visual * batch["question"][:, None, :]).sum(dim=-1)
    torch.testing.assert_close(reading, -mass.log().mean(), rtol=1e-4, atol=1e-5)


def test_a_steps_batch_is_the_same_whichever_worker_builds_it():
    """Batches come from the step number alone: a loader worker, the main process and a resumed run agree."""
    batches = TrainingBatches(build_tokenizer(), batch_size=2, questions_per_image=2)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, sampler=[3, 7], num_workers=1)
    for step, loaded in zip([3, 7], loader):
        direct = batches[step]
        assert loaded.keys() == direct.keys()
        assert all(torch.equal(loaded[key], direct[key]) for key in direct)
    assert not torch.equal(batches[3]["pixel_values"], batches[7]["pixel_values"])
    first = batches[3]
    assert first["owners"].tolist() == [0, 0, 1, 1] and first["firsts"].tolist() == [0, 2]
    assert first["dense"].shape == (2, 4, 24, 24) and len(first["pixel_values"]) == len(first["input_ids"]) == 4


def test_image_first_prompt_is_the_saved_chat_template(tmp_path):
    """The deep model's folder says how to ask it: its chat template renders prompt_image_first, and prompt_for
    reads it back; the shipped model keeps its question-first prompt."""
    build_processor(build_tokenizer(), image_first=True).save_pretrained(tmp_path)
    processor = LlavaProcessor.from_pretrained(tmp_path)
    message = [{"role": "user", "content": [{"type": "text", "text": "how many stars are there ?"}, {"type": "image"}]}]
    assert processor.apply_chat_template(message, tokenize=False) == prompt_image_first("how many stars are there ?")
    assert prompt_image_first("q") == "USER: <image>\nq ASSISTANT:"  # LLaVA-1.5's order
    question = "how many stars are there ?"
    assert prompt_for(processor)(question) == prompt_image_first(question)
    shipped = LlavaProcessor.from_pretrained(REFERENCE_DIR)
    assert prompt_for(shipped)(question) == prompt(question)
    # another checkpoint is asked through its own template (as `vtprune eval --tasks` asks it), one without as the
    # shipped model was trained
    shipped.chat_template = "{% for m in messages %}Q: {{ m['content'][-1]['text'] }} <image>{% endfor %} A:"
    assert prompt_for(shipped)(question) == f"Q: {question} <image> A:"
    shipped.chat_template = None
    assert prompt_for(shipped) is prompt


def test_layer_sources_repeat_each_layer_in_place():
    assert layer_sources(3, 6) == [0, 0, 1, 1, 2, 2]
    assert layer_sources(6, 16) == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5]
    assert layer_sources(6, 6) == list(range(6))
    with pytest.raises(ValueError):
        layer_sources(6, 4)


def test_upscaled_shipped_model_is_the_deep_model_computing_what_the_shipped_one_does(tmp_path):
    """Depth up-scaling: 16 LM and 6 tower layers, each copy its source (repeats with zero output projections,
    so identities), the same logits as the shipped model, and a folder from_pretrained loads whole in 16 MiB."""
    shipped, processor = load_reference()
    deep = build_model(build_tokenizer(), depth=DEPTHS["deep"])
    upscale_into(deep, shipped)
    assert deep.config.text_config.num_hidden_layers == 16 and deep.config.vision_config.num_hidden_layers == 6
    for stack, source_stack, sources in ((deep.model.language_model.layers, shipped.model.language_model.layers,
                                          layer_sources(6, 16)),
                                         (deep.model.vision_tower.encoder.layers, shipped.model.vision_tower.encoder.layers,
                                          layer_sources(3, 6))):
        for index, (layer, origin) in enumerate(zip(stack, sources)):
            repeat = index > 0 and sources[index - 1] == origin
            source = dict(source_stack[origin].named_parameters())
            for name, value in layer.named_parameters():
                if repeat and name.startswith(OUTPUT_PROJECTIONS):
                    assert not value.any(), (index, name)
                else:
                    assert torch.equal(value, source[name]), (index, name)
    sample = make_sample(2, 0)
    inputs = processor(images=[sample.image], text=[prompt(sample.question)], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(deep.eval()(**inputs).logits, shipped(**inputs).logits, rtol=1e-4, atol=1e-4)
    deep.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").stat().st_size < 16 * 2**20
    loaded = load_llava(tmp_path)  # raises on any missing, unexpected or misshapen weight
    assert all(torch.equal(value, deep.state_dict()[key]) for key, value in loaded.state_dict().items())


def test_hand_off_parts_fit_through_out_and_read_back_only_whole(tmp_path):
    """Files come back from $OUT only under 16 MiB; a missing part is refused, not joined into a shorter archive,
    and a rewrite leaves no part of a longer earlier one to be joined after it."""
    assert handoff.PART_BYTES < 16 * 2**20
    data = bytes(range(250))
    assert [p.name for p in handoff.write_parts(data, tmp_path, "x.tar", part_bytes=100)] == ["x.tar.00", "x.tar.01",
                                                                                               "x.tar.02"]
    (tmp_path / "x.tar.01").unlink()
    with pytest.raises(FileNotFoundError, match="not a whole run"):
        handoff.read_parts(tmp_path, "x.tar")
    handoff.write_parts(data[:150], tmp_path, "x.tar", part_bytes=100)
    assert handoff.read_parts(tmp_path, "x.tar") == data[:150]


def test_a_deep_run_resumes_from_its_hand_off_parts(tmp_path):
    """The exact run's code path at a toy batch: train, pack into parts (small ones here, to have several),
    unpack elsewhere, resume with a fresh optimizer whose learning rate ramps up again; other settings refuse."""
    settings = dict(batch_size=1, questions_per_image=1, eval_samples=2, eval_every=100, workers=0, device="cpu",
                    depth="deep", warmup=1)
    first = tmp_path / "first"
    with torch.enable_grad():  # conftest runs every test under no_grad
        train(first, steps=3, init=REFERENCE_DIR, minutes=1e-9, **settings)  # out of time after one step: saved there
    (first / "run_args").write_text("--depth deep\n")
    parts = handoff.pack(first, tmp_path / "out", part_bytes=3 * 2**20)
    assert [p.name for p in parts if p.name.startswith("handoff")] == ["handoff.tar.00", "handoff.tar.01", "handoff.tar.02"]
    assert all(p.stat().st_size <= 3 * 2**20 for p in parts)
    second = tmp_path / "second"
    assert sorted(handoff.unpack(tmp_path / "out", second)) == ["handoff.pt", "run_args", "train_log.jsonl"]
    carried = torch.load(second / "handoff.pt", weights_only=False)
    state = torch.load(first / "training_state.pt", weights_only=False)
    assert carried["step"] == 1 and "optimizer" not in carried
    for key, value in state["model"].items():
        assert torch.equal(carried["model"][key], value.half())
    handoff.unpack(tmp_path / "out", tmp_path / "model", name="model.tar")
    assert prompt_for(load_reference(tmp_path / "model")[1])("q") == prompt_image_first("q")
    with pytest.raises(CheckpointError, match="steps 3 \\(now 4\\)"):
        train(second, steps=4, **settings)
    with torch.enable_grad():
        train(second, steps=3, **settings)
    log = [json.loads(line) for line in (second / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]  # the carried log, continued
    assert [r["lr"] for r in log[1:]] == pytest.approx([1e-3 * learning_rate_factor(s, 3, 1) * (s - 1 + 1) / 100
                                                         for s in (1, 2)])
    resumed = torch.load(second / "training_state.pt", weights_only=False)
    assert resumed["step"] == 3 and resumed["rewarm_from"] == 1 and resumed["settings"]["depth"] == "deep"
    plot_training_logs({"deep": second / "train_log.jsonl"}, tmp_path / "curves.png")  # the README's curves command
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
