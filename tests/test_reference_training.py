"""The training recipe of the reference model: packed questions equal their own prompts; derived questions are right."""

import numpy as np
import torch

from vtprune.synth import make_sample, make_text
from vtprune.synth import vocabulary as synth_vocabulary
from vtprune.synth.generator import ANSWERS, words
from vtprune.synth.questions import derived_questions
from vtprune.synth.reference import build_model, build_tokenizer, pixel_values
from vtprune.synth.train import caption, encode, grounding_loss, pack_questions, patch_labels


def test_packed_questions_get_the_logits_of_their_own_prompts():
    tokenizer = build_tokenizer()
    model = build_model(tokenizer).eval()
    torch.nn.init.normal_(model.model.multi_modal_projector.linear_2.weight)  # images matter to the logits
    samples = [make_sample(0, i) for i in range(2)]
    asked = [[(s.question, s.answer, caption(s.meta), tuple(s.meta["relevant"]))]
             + [(q, a, None, boxes) for q, a, _, boxes in derived_questions(s.meta, np.random.default_rng(i), 3)]
             for i, s in enumerate(samples)]
    packed = pack_questions(tokenizer, asked)
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], attention_mask=packed["attention_mask"],
                       position_ids=packed["position_ids"], pixel_values=pixel_values([s.image for s in samples])).logits
        for b, questions in enumerate(asked):
            input_ids, mask = encode(tokenizer, [q for q, *_ in questions])
            alone = model(input_ids=input_ids, attention_mask=mask, logits_to_keep=1,
                          pixel_values=pixel_values([samples[b].image] * len(questions))).logits[:, -1]
            answer_at = (packed["answer_targets"][b] != -100).nonzero()[:, 0]
            assert len(answer_at) == len(questions)
            torch.testing.assert_close(logits[b, answer_at - 1], alone, rtol=1e-4, atol=1e-5)
            targets = packed["answer_targets"][b, answer_at].tolist()
            assert tokenizer.convert_ids_to_tokens(targets) == [a for _, a, *_ in questions]
    # the caption follows the scene's own answer only
    assert (packed["caption_targets"] != -100).sum() == sum(len(caption(s.meta).split()) for s in samples)


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


def test_grounding_loss_is_the_attention_mass_of_one_head_on_the_relevant_tokens():
    tokenizer = build_tokenizer()
    model = build_model(tokenizer).eval()
    samples = [make_sample(0, i) for i in range(2)]
    asked = [[(s.question, s.answer, None, tuple(s.meta["relevant"]))]
             + [(q, a, None, boxes) for q, a, _, boxes in derived_questions(s.meta, np.random.default_rng(i), 3)]
             for i, s in enumerate(samples)]
    packed = pack_questions(tokenizer, asked)
    layer = model.model.language_model.layers[-1]
    captured = {}
    layer.register_forward_pre_hook(lambda m, args, kwargs: captured.update(
        hidden=args[0] if args else kwargs["hidden_states"], rope=kwargs["position_embeddings"]), with_kwargs=True)
    inputs = dict(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                  pixel_values=pixel_values([s.image for s in samples]))
    with torch.no_grad():
        model(attention_mask=packed["attention_mask"], **inputs)
        ours = grounding_loss(layer, captured["hidden"], captured["rope"], packed)
        # eager attention wants the mask additive
        model.set_attn_implementation("eager")
        additive = torch.zeros(packed["attention_mask"].shape).masked_fill(~packed["attention_mask"], -1e30)
        weights = model(attention_mask=additive, output_attentions=True, **inputs).attentions[-1]
    head0 = weights[packed["query_rows"], 0, packed["query_positions"]]
    mass = (head0 * packed["relevant"]).sum(dim=1)
    has = packed["relevant"].any(dim=1)
    assert has.sum() >= 6
    torch.testing.assert_close(ours, -mass[has].log().mean(), rtol=1e-4, atol=1e-5)
