"""Prefill latency, decode speed, throughput, memory, KV-cache bytes and FLOPs of one model under one method.

Timings use CUDA events on a GPU and perf_counter on the CPU, around the whole
prefill (vision tower + method + LM); the median of `repeats` runs after `warmup`
runs is reported with its 10th-90th percentile spread. Two oracles bound a method:
- the input oracle ("oracle@B"): the model fed only the kept number of visual tokens, with
  no scoring and no engine: the limit of that budget, which no method may beat;
- the schedule oracle (`schedule_oracle_ms` of each method's row): the method's own prefill
  replaying its recorded decision (`Pruner.replaying`): the same per-layer token counts and
  kept set, with no scoring (the vision tower runs as the model's own: no q/k read, no merges
  in it; under compile_prefill its segments still break at the method's idle hooks, as for the
  method). method - schedule oracle is what scoring costs;
  schedule oracle - input oracle is what the schedule (full-length early layers) and the
  engine's bookkeeping cost.
Each method's row times the input oracle (`input_oracle_ms`, the pruner off the model), the
method and its schedule oracle in turn, repeat by repeat, so that drift weighs on all three
alike; the "oracle@B" row times the input oracle in turn with the unpruned model.
`select_ms` is the time in the method's own selection per stage (Method.select_batch: the batch's items at once),
and in a BlockMergingMethod's merges inside the tower ("tower merges").
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import statistics
import time
from dataclasses import asdict, dataclass

import torch

import vtprune
from vtprune.engine.cache import output_cache
from vtprune.methods import BlockMergingMethod

from .flops import prefill_flops
from .presets import AnyresLayout, Preset, anyres_layout, preset_inputs


@dataclass
class Measurement:
    config: str  # "unpruned", "fastv@64", "oracle@64"
    method: str
    budget: int | None
    batch: int
    prefill_ms: float  # median
    prefill_ms_p10: float
    prefill_ms_p90: float
    decode_tokens_per_s: float  # batch x (N - 1) tokens over generate(N) - generate(1); NaN if noise swamps it
    throughput_samples_per_s: float  # prefill + new_tokens of decode, at this batch
    kv_cache_bytes: int
    peak_memory_bytes: int | None
    prefill_tflops: float  # analytical, whole batch
    equivalent_budget: float
    visual_tokens_per_layer: list[int]  # first sample
    schedule_oracle_ms: float | None = None  # median prefill replaying the method's decision (no scoring)
    input_oracle_ms: float | None = None  # median prefill of the input oracle, timed alternating with the method
    schedule_oracle_spread: float | None = None  # p90 / p10 of the schedule oracle's times
    input_oracle_spread: float | None = None  # p90 / p10 of the input oracle's times
    unpruned_ms: float | None = None  # an oracle's row: the unpruned prefill's median, timed alternating with it
    unpruned_spread: float | None = None  # p90 / p10 of those unpruned times
    select_ms: dict[str, float] | None = None  # per stage ("layer 2", "vision"): the method's select, per prefill

    def as_dict(self) -> dict:
        return asdict(self)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(run, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    began = time.perf_counter()
    run()
    return 1000 * (time.perf_counter() - began)


def kv_cache_bytes(cache) -> int:
    """Bytes held by a DynamicCache, read off its layers' key and value tensors."""
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if getattr(layer, "keys", None) is not None)


@contextlib.contextmanager
def oracle_truncation(model, preset: Preset, keep: int):
    """The model sees only the first `keep` visual tokens of each image, chosen with no scoring at all.

    LLaVA: the projector's output is cut to `keep` tokens (the prompt carries `keep`
    placeholders), so the vision tower's cost is the same as the method's. LLaVA-NeXT:
    each image's packed features (base grid, then the unpadded high-resolution grid with a
    newline after each row) are cut to their first `keep` visual tokens in that order (the
    base grid first) and all their newline tokens, in place: the newlines are no visual
    tokens, a method neither prunes nor counts them, so the oracle's LM runs on exactly as
    many tokens as a method's at the LLM input (text + newlines + `keep`); the tower still
    encodes every tile. LLaVA-OneVision: as LLaVA-NeXT (its packing is the same, the high-resolution
    grid possibly shrunk first). Video-LLaVA: likewise, the video's projected features (each frame's
    CLS token, then its patches, frame after frame) are cut to the first `keep` patches in
    that order (the first frame's first) and all the frames' CLS tokens, which no method
    prunes nor counts, so the LM sees text + frames + `keep` tokens as a method's does; the
    video tower still encodes every frame. Qwen2-VL's and Qwen2.5-VL's M-RoPE ties tokens to an image grid,
    so their oracle is a smaller image with that many tokens (see oracle_inputs): their
    vision tower also does less, and method - oracle then includes that saving too.
    """
    if preset.family == "llava":
        handle = model.model.multi_modal_projector.register_forward_hook(lambda module, args, output: output[:, :keep])
        try:
            yield
        finally:
            handle.remove()
        return
    if preset.family == "video_llava":
        with _video_truncation(model, preset, keep):
            yield
        return
    if preset.family not in ("llava_next", "llava_onevision"):
        yield
        return
    base = model.model
    original = base.get_image_features  # generate() encodes through base_model.get_image_features too
    kept = oracle_kept_features(anyres_layout(model.config, preset.image_size), keep)

    @functools.wraps(original)  # keeps the signature, which generate() reads
    def first_visual_tokens(*args, **kwargs):
        output = original(*args, **kwargs)
        if any(len(features) != len(kept) for features in output.pooler_output):
            raise ValueError(f"the oracle expects {len(kept)} packed features per image: images of {preset.image_size}")
        output.pooler_output = [features[kept.to(features.device)] for features in output.pooler_output]
        return output

    base.get_image_features = first_visual_tokens
    try:
        yield
    finally:
        del base.get_image_features


@contextlib.contextmanager
def _video_truncation(model, preset: Preset, keep: int):
    base = model.model
    original = base.get_video_features
    kept = video_oracle_kept(preset.frames, _side(model), keep)

    @functools.wraps(original)  # keeps the signature
    def first_visual_tokens(*args, **kwargs):
        output = original(*args, **kwargs)
        features = output.pooler_output  # (videos x frames, CLS + patches, hidden)
        if features.shape[0] % preset.frames or preset.frames * features.shape[1] != len(kept):
            raise ValueError(f"the oracle expects videos of {preset.frames} frames of {len(kept) // preset.frames} "
                             f"tokens: got {tuple(features.shape[:2])}")
        per_video = features.reshape(-1, len(kept), features.shape[-1])
        output.pooler_output = per_video[:, kept.to(features.device)]
        return output

    base.get_video_features = first_visual_tokens
    try:
        yield
    finally:
        del base.get_video_features


def video_oracle_kept(frames: int, side: int, keep: int) -> torch.Tensor:
    """Which of a Video-LLaVA video's features (frame after frame: its CLS token, then its side x side patches)
    the oracle keeps: every frame's CLS token and the first `keep` patches, in that order."""
    cls = torch.arange(frames * (side * side + 1)) % (side * side + 1) == 0
    return cls | (~cls & (torch.cumsum(~cls, 0) <= keep))


def _side(model) -> int:
    return model.config.vision_config.image_size // model.config.vision_config.patch_size


def oracle_kept_features(layout: AnyresLayout, keep: int) -> torch.Tensor:
    """Which of a LLaVA-NeXT (or OneVision) image's packed features the oracle keeps: every newline (the last of each
    high-resolution row) and the first `keep` visual tokens, in packing order."""
    position = torch.arange(layout.placeholders)
    newline = (position >= layout.base) & ((position - layout.base) % (layout.cols + 1) == layout.cols)
    return newline | (~newline & (torch.cumsum(~newline, 0) <= keep))


def oracle_grid(keep: int) -> tuple[int, int]:
    """Qwen2-VL patches (h, w) whose merged grid holds exactly `keep` tokens, as square as possible."""
    rows = max(r for r in range(1, int(keep**0.5) + 1) if keep % r == 0)
    return 2 * rows, 2 * (keep // rows)


def oracle_inputs(model, preset: Preset, batch: int, keep: int, device, dtype):
    if preset.family in ("llava", "llava_next", "llava_onevision", "video_llava"):
        inputs = preset_inputs(model, preset, batch, device=device, dtype=dtype)
        image_id = model.config.image_token_id
        if preset.family in ("llava_next", "llava_onevision"):  # the kept visual tokens and every newline
            placeholders = int(oracle_kept_features(anyres_layout(model.config, preset.image_size), keep).sum())
        elif preset.family == "video_llava":  # the kept visual tokens and every frame's CLS token
            image_id = model.config.video_token_id
            placeholders = int(video_oracle_kept(preset.frames, _side(model), keep).sum())
        else:
            placeholders = keep
        rows = []
        for row in inputs["input_ids"]:
            visual = torch.nonzero(row == image_id).flatten()
            rows.append(torch.cat([row[: visual[0] + min(placeholders, len(visual))], row[visual[-1] + 1 :]]))
        input_ids = torch.stack(rows)
        return dict(inputs, input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    smaller = dataclasses.replace(preset, image_patches=oracle_grid(keep))
    return preset_inputs(model, smaller, batch, device=device, dtype=dtype)


def measure(model, preset: Preset, method: str, budget: int | None, batch: int, *, repeats: int = 20, warmup: int = 3,
            new_tokens: int = 16, device="cpu", dtype=torch.float32, options: dict | None = None) -> Measurement:
    """One configuration: method "unpruned", "oracle" or a registered method. With compile_prefill open on the
    model (run_bench's --compile), each new prefill shape is compiled during the warm-up."""
    device = torch.device(device)
    inputs = preset_inputs(model, preset, batch, device=device, dtype=dtype)
    pruner, scope, oracle = None, contextlib.nullcontext(), None

    def apply():
        return vtprune.apply(model, method, budget, **(options or {}))

    times, unpruned_times = [], []
    if method == "oracle":
        times, unpruned_times = _oracle_and_unpruned_times(model, preset, inputs, batch, budget, device, dtype,
                                                           warmup, repeats)
        inputs = oracle_inputs(model, preset, batch, budget, device, dtype)
        scope = oracle_truncation(model, preset, budget)
    elif method != "unpruned":
        pruner = apply()
        oracle = input_oracle(model, preset, batch, budget, device, dtype)
    try:
        with torch.no_grad(), scope:
            def prefill():
                return model(**inputs, use_cache=True, logits_to_keep=1)

            for _ in range(0 if method == "oracle" else warmup):  # (the oracle warmed with its timing above)
                prefill()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            replayed, oracle_times = [], []
            if method == "unpruned":
                times = [_time_ms(prefill, device) for _ in range(repeats)]
            elif pruner is not None:
                pruner, times, replayed, oracle_times = _alternating_times(pruner, apply, prefill, oracle, device,
                                                                           repeats)
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            output = prefill()
            kv = kv_cache_bytes(output_cache(output))
            stats = pruner.last_stats if pruner else None
            select_ms = None if pruner is None else _select_ms(pruner, prefill, device, repeats)

            def generate(tokens: int):
                return lambda: model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                              pad_token_id=0)

            # Decode is priced as generate(N) - generate(1): both pay the same prefill.
            runs = max(3, repeats // 4)
            for _ in range(min(warmup, 2)):  # generate's prefill passes other arguments: compiled, it is another
                generate(1)()  # graph (and CUDA-graph trees record a shape on its second run), warmed here
            generate_ms = statistics.median(_time_ms(generate(new_tokens), device) for _ in range(runs))
            first_token_ms = statistics.median(_time_ms(generate(1), device) for _ in range(runs))
    finally:
        if pruner is not None:
            pruner.remove()

    p10, p90 = percentiles(times)
    sequence = inputs["input_ids"].shape[1]
    visual = _visual_counts(model, preset, inputs, stats)
    # LLaVA-NeXT's and OneVision's newlines and Video-LLaVA's frame CLS tokens count as text
    text = sequence - (visual[0] if stats is None else stats.visual_tokens_per_sample[0])
    tokens_per_layer = [text + v for v in visual]
    flops = prefill_flops(model, tokens_per_layer, *_vision_sequences(model, preset, inputs))
    decode_tokens_per_s, samples_per_s = generation_rates(batch, new_tokens, generate_ms, first_token_ms)
    return Measurement(
        config=method if budget is None else f"{method}@{budget}",
        method=method, budget=budget, batch=batch,
        prefill_ms=statistics.median(times), prefill_ms_p10=p10, prefill_ms_p90=p90,
        decode_tokens_per_s=decode_tokens_per_s, throughput_samples_per_s=samples_per_s,
        kv_cache_bytes=kv, peak_memory_bytes=peak,
        prefill_tflops=batch * flops["total"] / 1e12,
        equivalent_budget=sum(visual) / len(visual),
        visual_tokens_per_layer=visual,
        schedule_oracle_ms=_median(replayed), input_oracle_ms=_median(oracle_times), select_ms=select_ms,
        schedule_oracle_spread=_spread(replayed), input_oracle_spread=_spread(oracle_times),
        unpruned_ms=_median(unpruned_times), unpruned_spread=_spread(unpruned_times),
    )


def generation_rates(batch: int, new_tokens: int, generate_ms: float, first_token_ms: float) -> tuple[float, float]:
    """(decode tokens/s, samples/s) of a batch: generate(new_tokens) - generate(1) decoded new_tokens - 1 steps of
    every sample (both paid the same prefill; NaN when noise makes the difference <= 0), and generate(new_tokens)
    answered the batch's samples whole."""
    decode_ms = generate_ms - first_token_ms
    decode = batch * (new_tokens - 1) / (decode_ms / 1000) if decode_ms > 0 else float("nan")
    return decode, batch / (generate_ms / 1000)


def percentiles(times: list[float]) -> tuple[float, float]:
    """(10th, 90th) percentile, interpolated between the sorted times (at 5 repeats not simply the extremes)."""
    if len(times) < 2:
        return times[0], times[0]
    cuts = statistics.quantiles(times, n=10, method="inclusive")
    return cuts[0], cuts[-1]


def _median(times: list[float]) -> float | None:
    return statistics.median(times) if times else None


def _spread(times: list[float]) -> float | None:
    if not times:
        return None
    p10, p90 = percentiles(times)
    return p90 / p10


def input_oracle(model, preset: Preset, batch: int, budget: int, device, dtype):
    """The input oracle's prefill for this config, to run with no pruner on the model."""
    inputs = oracle_inputs(model, preset, batch, budget, device, dtype)

    def prefill():
        with oracle_truncation(model, preset, budget):
            return model(**inputs, use_cache=True, logits_to_keep=1)

    return prefill


def _oracle_and_unpruned_times(model, preset: Preset, inputs: dict, batch: int, budget: int, device, dtype,
                               warmup: int, repeats: int) -> tuple[list[float], list[float]]:
    """(the input oracle's prefill times, the unpruned model's) timed in turn, repeat by repeat: the speedups of the
    oracle's row, and through it of every method's row at its budget, come from runs made seconds apart."""
    oracle = input_oracle(model, preset, batch, budget, device, dtype)

    def unpruned():
        return model(**inputs, use_cache=True, logits_to_keep=1)

    times, unpruned_times = [], []
    with torch.no_grad():
        for _ in range(warmup):
            oracle(), unpruned()
        for _ in range(repeats):
            unpruned_times.append(_time_ms(unpruned, device))
            times.append(_time_ms(oracle, device))
    return times, unpruned_times


def _alternating_times(pruner, reapply, prefill, oracle, device: torch.device, repeats: int):
    """(the pruner on the model, the method's prefill times, the schedule oracle's, the input oracle's). The three
    run in turn, each repeat: the input oracle (the pruner taken off the model and put back after), the method, the
    method replaying its decision. So a machine's drift (clocks, heat, a neighbour's load) weighs on all three
    alike, and the ratios compare runs made seconds apart."""
    if pruner.last_decision is None:  # no warm-up ran: the decision to replay is made here, untimed
        prefill()
    decision = pruner.last_decision
    pruner.remove()
    oracle()  # warm
    pruner = reapply()
    with pruner.replaying(decision):
        prefill()  # warm
    times, replayed, floor = [], [], []
    for _ in range(repeats):
        pruner.remove()
        floor.append(_time_ms(oracle, device))
        pruner = reapply()
        times.append(_time_ms(prefill, device))
        with pruner.replaying(decision):
            replayed.append(_time_ms(prefill, device))
    return pruner, times, replayed, floor


def _select_ms(pruner, prefill, device: torch.device, repeats: int) -> dict[str, float]:
    """ms per prefill in the method's select_batch at each stage ("layer 2", "vision"), and in a BlockMergingMethod's
    merges inside the tower ("tower merges")."""
    spent: dict[str, float] = {}
    method = pruner.method

    def timed(work, stage_of):
        def run(first, *rest):
            stage = stage_of(first)
            _synchronize(device)
            began = time.perf_counter()
            result = work(first, *rest)
            _synchronize(device)
            spent[stage] = spent.get(stage, 0.0) + 1000 * (time.perf_counter() - began)
            return result

        return run

    # on this instance only, for these runs
    method.select_batch = timed(method.select_batch, lambda views: f"layer {views[0].layer}"
                                if hasattr(views[0], "layer") else "vision")
    if isinstance(method, BlockMergingMethod):
        method.merge = timed(method.merge, lambda block: "tower merges")
    runs = max(3, repeats // 4)
    try:
        for _ in range(runs):
            prefill()
    finally:
        vars(method).pop("select_batch")
        vars(method).pop("merge", None)
    return {stage: total / runs for stage, total in spent.items()}


def _visual_counts(model, preset: Preset, inputs, stats) -> list[int]:
    """Visual tokens entering each decoder layer, first sample (LLaVA-NeXT's and OneVision's newline placeholders
    and Video-LLaVA's frame CLS tokens are text-like)."""
    if stats is not None:
        return stats.visual_tokens_per_layer[0]
    if preset.family == "video_llava":
        count = int((inputs["input_ids"][0] == model.config.video_token_id).sum()) - preset.frames
    else:
        count = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    if preset.family in ("llava_next", "llava_onevision"):
        count -= anyres_layout(model.config, preset.image_size).newlines
    return [count] * model.config.text_config.num_hidden_layers


def preset_visual_tokens(model, preset: Preset) -> int:
    """Visual tokens of one prompt's image (Video-LLaVA: its video), as a budget counts them."""
    return _visual_counts(model, preset, preset_inputs(model, preset, 1, device=model.device, dtype=model.dtype),
                          None)[0]


def _vision_sequences(model, preset: Preset, inputs) -> tuple[list[int], list[tuple[int, int]] | None]:
    """Tokens of each sequence the vision tower runs for the first sample's image (one per LLaVA-NeXT or OneVision
    tile, one per Video-LLaVA frame), and the image's (h, w) patches on Qwen (Qwen2.5-VL's windows need them)."""
    if preset.family == "video_llava":  # the video tower: each frame's patches + CLS
        return [_side(model) ** 2 + 1] * inputs["pixel_values_videos"].shape[1], None
    if preset.family in ("llava", "llava_next", "llava_onevision"):
        side = model.config.vision_config.image_size // model.config.vision_config.patch_size
        tiles = anyres_layout(model.config, preset.image_size).tiles if preset.family != "llava" else 1
        cls = 0 if preset.family == "llava_onevision" else 1  # SigLIP has no CLS token
        return [side * side + cls] * tiles, None
    _, h, w = inputs["image_grid_thw"][0].tolist()
    return [h * w], [(h, w)]
