import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers.utils import logging

from vtprune.tiny import tiny_llava, tiny_qwen2_vl

logging.set_verbosity_error()  # the tiny Qwen config's token ids are out of its tiny vocabulary on purpose

FAMILIES = {"llava": tiny_llava, "qwen2_vl": tiny_qwen2_vl}
# Placeholder ids must never be generated, or a recompute would see a phantom image.
SUPPRESS = [100, 101, 102, 103]


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


@pytest.fixture(params=["eager", "sdpa"])
def attn(request):
    return request.param


@pytest.fixture
def model(family, attn):
    return FAMILIES[family](attn)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def greedy(model, inputs, steps=4, **kwargs):
    return model.generate(
        **inputs, max_new_tokens=steps, do_sample=False, suppress_tokens=SUPPRESS,
        output_logits=True, return_dict_in_generate=True, pad_token_id=0, **kwargs,
    )
