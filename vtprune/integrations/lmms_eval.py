"""`lmms-eval --model vtprune`: any checkpoint vtprune supports, pruned by any method, in lmms-eval's harness.

    lmms-eval --model vtprune --model_args pretrained=PATH,method=clse,budget=64 --tasks pope --batch_size 8

model_args: `pretrained` (a checkpoint folder), `method` and `budget` (leave both out for the unpruned model),
the method's own options by name (`score=attn`; a tuple as `2/6/15`, as in `vtprune eval --methods`), and
optionally `max_new_tokens` (default: each task's own, else the family's lmms-eval model's: 128 for Qwen2-VL,
32768 for Qwen2.5-VL, 1024 for the LLaVA families), `dtype` (auto, bfloat16, float16, float32),
`attn_implementation` (sdpa or eager), `chat_template` (a Jinja file, for a checkpoint saved without one) and
`max_frames` (frames sampled from a task's video files; default as `vtprune eval`: 8 for Video-LLaVA, else 32).
The method is applied once, when the model loads; lmms-eval's clean() removes it.

Answers come from `vtprune.eval.generation`, the code `vtprune eval --tasks` answers with: the question under
the processor's chat template (its images first, lmms-eval's `<image>` markers dropped, as its Qwen models do;
its llava_hf keeps them in the text), batches of --batch_size padded on the left (videos of one frame count a
batch), decoded as the family's lmms-eval model reads the task's settings (`decoding`). Only generation tasks
run: a task scored by log-likelihood stops with NotImplementedError.
"""

from __future__ import annotations

import inspect
import numbers
import typing
from pathlib import Path

import torch
from accelerate import Accelerator
from lmms_eval.api.model import lmms
from lmms_eval.utils import Collator
from PIL import Image
from tqdm import tqdm

import vtprune
from vtprune.eval.benchmark_eval import default_frames
from vtprune.eval.generation import by_frame_count, check_takes_videos, generate_answers, load_checkpoint

UNPRUNED = (None, "", "none", "unpruned")
# For a task whose generation_kwargs set none: the family's lmms-eval model's default (qwen2_vl.py, qwen2_5_vl.py;
# llava_hf.py, video_llava.py and llava_onevision.py: 1024).
DEFAULT_MAX_NEW_TOKENS = {"qwen2_vl": 128, "qwen2_5_vl": 32768}
DTYPES = ("auto", "bfloat16", "float16", "float32")


class Vtprune(lmms):
    """lmms-eval's model interface over a checkpoint that `vtprune.apply` prunes (see the module's docstring)."""

    is_simple = True  # lmms-eval hands over (question, gen_kwargs, doc_to_visual, doc_id, task, split)

    def __init__(self, pretrained: str, method: str | None = None, budget: int | float | None = None,
                 batch_size: int | str = 1, max_new_tokens: int | None = None, device: str | None = None,
                 dtype: str = "auto", attn_implementation: str = "sdpa", chat_template: str | None = None,
                 max_frames: int | None = None, max_batch_size=None, **method_options) -> None:
        super().__init__()
        # (checked before the checkpoint loads, which takes minutes on a real one)
        self.batch_size = fixed_batch_size(batch_size)
        self.max_new_tokens = None if max_new_tokens is None else \
            count_arg("max_new_tokens", max_new_tokens, "tokens generated per answer; leave it out for each task's own")
        frames = None if max_frames is None else \
            count_arg("max_frames", max_frames, "frames sampled from a video file; leave it out for the default")
        self.chat_template = read_chat_template(chat_template) if chat_template else None
        device = checked_device(device)
        dtype = torch_dtype(dtype)
        # the evaluator shards requests over accelerate's processes; each process takes its own device
        self.accelerator = Accelerator()
        self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        model, self.processor = load_checkpoint(pretrained, dtype=dtype, attn_implementation=attn_implementation)
        self.model = model.to(process_device(device, self.accelerator.device))
        self.max_frames = frames or default_frames(self.model)
        self.pruner = apply_method(self.model, self.processor, pretrained, method, budget, method_options)

    def clean(self):
        """lmms-eval frees the model before a judge model loads: the pruner, which holds it, goes first."""
        if self.pruner is not None:
            self.pruner.remove()
            self.pruner = None
        super().clean()

    def generate_until(self, requests) -> list[str]:
        """Answers, longest prompts first in batches of the same generation settings (as lmms-eval's own
        models batch), returned in the requests' order."""
        order = Collator([request.args for request in requests], longest_first, grouping=True)
        batches = order.get_batched(n=self.batch_size)
        progress = tqdm(total=-(-len(requests) // self.batch_size), disable=self.rank != 0, desc="vtprune answering")
        answers = []
        for batch in batches:
            answers += self.answer_batch(batch)
            progress.update(1)
        progress.close()
        return order.get_original(answers)

    def answer_batch(self, batch: list[tuple]) -> list[str]:
        contexts, all_settings, doc_to_visual, doc_ids, tasks, splits = zip(*batch)
        settings = all_settings[0]  # the Collator's groups share them
        visuals = [self.visuals_of(*request) for request in zip(doc_to_visual, tasks, splits, doc_ids)]
        videos = [videos for _, videos in visuals]
        answers: list = [None] * len(contexts)
        for rows in by_frame_count(videos):
            part = generate_answers(
                self.model, self.processor, [contexts[i] for i in rows], [visuals[i][0] for i in rows],
                self.max_new_tokens_for(settings), videos=[videos[i] for i in rows], chat_template=self.chat_template,
                stop=settings.get("until"), **decoding(settings, self.model.config.model_type))
            for i, answer in zip(rows, part):
                answers[i] = answer
        for context, answer in zip(contexts, answers):
            self.cache_hook.add_partial("generate_until", (context, settings), answer)
        return answers

    def visuals_of(self, doc_to_visual, task: str, split: str, doc_id) -> tuple[list, list]:
        """(images, videos) of one document: PIL images as they are (the processor converts them to RGB, a
        transparent one over white), video files as `max_frames` frames."""
        images, videos = [], []
        for visual in doc_to_visual(self.task_dict[task][split][doc_id]) or []:
            if isinstance(visual, Image.Image):
                images.append(visual)
            elif isinstance(visual, str):
                from lmms_eval.models.model_utils.load_video import read_video

                check_takes_videos(self.processor, [task])
                videos.append(read_video(visual, num_frm=self.max_frames))
            else:
                raise TypeError(f"{task}: vtprune's lmms-eval model takes images and video files; got a "
                                f"{type(visual).__name__}")
        return images, videos

    def max_new_tokens_for(self, settings: dict) -> int:
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        default = DEFAULT_MAX_NEW_TOKENS.get(self.model.config.model_type, 1024)
        return int(settings.get("max_new_tokens", default))

    def loglikelihood(self, requests):
        raise NotImplementedError(
            "vtprune's lmms-eval model generates answers (output_type generate_until); tasks scored by "
            "log-likelihood (loglikelihood, multiple_choice) are not supported: run the task's generation variant")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("vtprune's lmms-eval model answers one turn per request (output_type "
                                  "generate_until); multi-round tasks are not supported")


def apply_method(model, processor, pretrained: str, method: str | None, budget, options: dict):
    """The pruner of `method` at `budget` on the model (None when unpruned), with the options `vtprune eval`
    supplies itself (CLASP's tokenizer and the calibration table beside the checkpoint)."""
    if method in UNPRUNED:
        if options:
            own = [name for name in inspect.signature(Vtprune).parameters if name != "method_options"]
            raise ValueError(f"unknown model_args {', '.join(sorted(options))}: vtprune's lmms-eval model takes "
                             f"{', '.join(own)}, and a method's own options with method=")
        if budget is not None:
            raise ValueError(f"budget={budget} needs a method (method=fastv, ...)")
        return None
    if budget is None:
        raise ValueError(f"method={method} needs a budget: visual tokens kept per image (budget=64) or a "
                         f"fraction (budget=0.25)")
    from vtprune.methods import get_method

    supplied = get_method(method).checkpoint_options(pretrained, processor)
    return vtprune.apply(model, method, budget, **{**supplied, **typed_options(method, options)})


def typed_options(method: str, options: dict) -> dict:
    """model_args values (lmms-eval parses numbers and booleans only) as the types the method's Options declare,
    spelled as on `vtprune eval --methods` (a tuple as 2/6/15)."""
    from vtprune.cli_args import coerce
    from vtprune.methods import get_method

    hints = typing.get_type_hints(get_method(method).Options)
    typed = {}
    for key, value in options.items():
        if key not in hints:
            typed[key] = value  # the method's own check names its options
            continue
        try:
            typed[key] = coerce(str(value), hints[key])
        except ValueError as error:
            raise ValueError(f"method {method} option {key} {error}") from None
    return typed


def fixed_batch_size(batch_size) -> int:
    return count_arg("batch_size", batch_size, "vtprune's lmms-eval model takes a fixed --batch_size N")


def count_arg(key: str, value, meaning: str) -> int:
    """A model_arg that counts something, as lmms-eval hands it over (its parser makes 8 an int, -3 a float -3.0
    and abc a str; --batch_size comes as typed): a whole number >= 1, else a ValueError naming the key."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    whole = isinstance(number, numbers.Real) and not isinstance(number, bool) and float(number).is_integer()
    if not whole or number < 1:
        raise ValueError(f"{key}={value} must be a whole number >= 1 ({meaning})")
    return int(number)


def read_chat_template(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as error:
        raise ValueError(f"chat_template={path} cannot be read ({error.strerror or error}): give the path of a "
                         "Jinja chat template file, or leave it out for the checkpoint's own") from None


def checked_device(device: str | None) -> torch.device | None:
    """The device model_args or --device name (None: accelerate's for each process), refused where torch does not
    know it or this machine lacks it."""
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device} is not a device torch knows: give cpu, cuda, cuda:N or mps, or leave "
                         "it out for accelerate's (each process its own)") from None
    count = torch.cuda.device_count() if parsed.type == "cuda" and torch.cuda.is_available() else 0
    if parsed.type == "cuda" and (parsed.index or 0) >= count:
        raise ValueError(f"device={device}: this machine has {count} CUDA device(s); give cuda:N with N below "
                         f"{count}, or device=cpu")
    return parsed


def process_device(asked: torch.device | None, own: torch.device) -> torch.device:
    """Where this process runs: `own`, accelerate's (each process its GPU), where the user named none or only its
    kind ("cuda" with several processes would put them all on the first GPU, as lmms-eval's own llava_hf does not);
    otherwise the one named."""
    return own if asked is None or (asked.index is None and asked.type == own.type) else asked


def torch_dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"dtype={name} is not one of {', '.join(DTYPES)}")
    return name if name == "auto" else getattr(torch, name)


def longest_first(args: tuple):
    """Sort key: the longest question first, so a batch's padding stays small and memory runs out at once, if
    it does (lmms-eval's models sort the same way)."""
    return -len(args[0]), args[0]


def decoding(settings: dict, model_type: str) -> dict:
    """The task's decoding settings as the family's lmms-eval model reads them, for generate: llava_onevision
    samples where the task sets do_sample, llava_hf (LLaVA-1.5, LLaVA-NeXT), qwen2_vl and qwen2_5_vl where its
    temperature is above 0, each then at that temperature (1 if none) with its top_p, and with its num_beams;
    video_llava always decodes greedily (it passes a temperature without do_sample)."""
    if model_type == "video_llava":
        return {"do_sample": False, "num_beams": 1}
    temperature = settings.get("temperature") or 0
    sample = bool(settings.get("do_sample")) if model_type == "llava_onevision" else temperature > 0
    chosen = {"do_sample": sample, "num_beams": int(settings.get("num_beams") or 1)}
    if sample:
        chosen["temperature"] = temperature or 1.0
        if settings.get("top_p") is not None:
            chosen["top_p"] = settings["top_p"]
    return chosen
