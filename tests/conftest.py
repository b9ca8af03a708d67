import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import logging as std_logging

import pytest
import torch
from transformers.utils import logging

from vtprune.methods import REGISTRY, BlockMergingMethod
from vtprune.tiny import (
    tiny_llava, tiny_llava_next, tiny_llava_onevision, tiny_qwen2_5_vl, tiny_qwen2_vl, tiny_video_llava,
)

# Tiny models gain nothing from a second intra-op thread, and lose ten times over when other work shares the cores.
torch.set_num_threads(1)


class _Deprecations(std_logging.Handler):
    """The deprecation notices transformers logs (most are logged, not warned, so filterwarnings cannot see them),
    each listed once at the end of the run: the early warning of what its next release removes."""

    def __init__(self):
        super().__init__(std_logging.WARNING)
        self.seen: dict[str, str] = {}

    def emit(self, record):
        message = record.getMessage()
        if any(word in message.lower() for word in ("deprecat", "will be removed", "backward compat")):
            self.seen.setdefault(message, record.name)


DEPRECATIONS = _Deprecations()
logging.set_verbosity_warning()
for handler in logging.get_logger().handlers:  # the console gets errors only: the tiny Qwen config's token ids
    handler.setLevel(std_logging.ERROR)        # are out of its tiny vocabulary on purpose
logging.get_logger().addHandler(DEPRECATIONS)


def pytest_terminal_summary(terminalreporter):
    if DEPRECATIONS.seen:
        terminalreporter.section("deprecation notices transformers logged (its next release may remove these)")
        for message, logger in DEPRECATIONS.seen.items():
            terminalreporter.write_line(f"{logger}: {message}")

FAMILIES = {
    "llava": tiny_llava, "llava_next": tiny_llava_next, "qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl,
    "video_llava": tiny_video_llava, "llava_onevision": tiny_llava_onevision,
}
# Placeholder ids must never be generated, or a recompute would see a phantom image; nor the pad id,
# which generate reads as padding when it infers a mask from the ids; nor the tiny Llama's eos (2), which
# would end one sample's generation early alone but not in its batch.
SUPPRESS = [0, 2, 100, 101, 102, 103, 104]


# The families whose adapters have the vision-encoder stage; methods acting there refuse the others.
VISION_STAGE_FAMILIES = {"llava", "llava_next", "video_llava"}
# Methods merging inside the tower's blocks need one tower row per image: no anyres tiles, no video frames.
BLOCK_MERGING_FAMILIES = {"llava", "video_llava"}


@pytest.fixture(autouse=True)
def _only_supported_pairs(request):
    """A (family, method) pair the README's table marks unsupported is skipped, not run: its refusal is tested
    on its own (test_vision_stage)."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    family = params.get("family", params.get("video_family"))
    method = params.get("method")
    if not (family and isinstance(method, str) and method in REGISTRY):
        return
    if REGISTRY[method].acts_in_vision and family not in VISION_STAGE_FAMILIES:
        pytest.skip(f"{method} acts in the vision encoder, which vtprune does not support on {family}")
    skip_block_merging_on(method, family, videos="video_family" in params)


def skip_block_merging_on(method: str, family: str, videos: bool) -> None:
    """Skip a method merging inside the tower's rows where vtprune refuses it (tiled images, videos; the refusal
    is tested in test_tome)."""
    if issubclass(REGISTRY[method], BlockMergingMethod) and (family not in BLOCK_MERGING_FAMILIES or videos):
        pytest.skip(f"{method} merges inside the vision tower's rows, which vtprune supports on single-row images only")


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


@pytest.fixture
def held_elsewhere():
    """A context manager: another process holds a results folder's lock until the block ends, then dies."""
    import contextlib
    import subprocess
    import sys

    holder = (
        "import sys\n"
        "from vtprune.eval.lock import hold\n"
        "with hold(sys.argv[1], None if sys.argv[2] == 'alone' else int(sys.argv[2])):\n"
        "    print('held', flush=True)\n"
        "    sys.stdin.read()\n"
    )

    @contextlib.contextmanager
    def hold_in_another_process(folder, rank=None):
        """rank: as a process of a data-parallel run."""
        process = subprocess.Popen([sys.executable, "-c", holder, str(folder), "alone" if rank is None else str(rank)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert process.stdout.readline().strip() == "held"
            yield process
        finally:
            process.kill()
            process.wait()

    return hold_in_another_process
