"""Stock transformers processors for the tiny models of `vtprune.tiny`: prompts made the way a user makes them.

`tiny_processor(model)` returns the family's own processor class (LlavaProcessor,
LlavaNextProcessor, Qwen2VLProcessor, Qwen2_5_VLProcessor, VideoLlavaProcessor,
LlavaOnevisionProcessor) around a word-level tokenizer whose 128 ids fit the tiny
vocabulary (its placeholders are the tiny models' ids) and the family's stock image and
video processors, sized from the model's config so that the placeholders a processor
expands are exactly the features the model encodes. Built in milliseconds; nothing is
downloaded.

transformers' video processors need torchvision, and a processor of a family that takes
videos cannot even be built without one. Where torchvision is missing (this project does
not depend on it), `FramesVideoProcessor` stands in: each frame goes through the family's
stock image processor, giving the stock video processor's shapes and layout; the text
expansion, images and tokenizer stay the stock ones.
"""

from __future__ import annotations

import importlib.util

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .tiny import (
    IMAGE_TOKEN, PAD, QWEN_IMAGE_TOKEN, QWEN_VIDEO_TOKEN, QWEN_VISION_END, QWEN_VISION_START, TEXT_TOKENS, VIDEO_TOKEN,
    VOCAB,
)

# Words for the ids tiny prompts are drawn from (TEXT_TOKENS), enough for the questions CLASP's router reads.
WORDS = (
    "USER ASSISTANT : ? . , ' what which how many is are there the a an of in on at to left right above below "
    "colour color red blue green black white yellow shape shapes square circle triangle big small count number "
    "text say says read written word letter where photo picture image video scene weather describe best this "
    "that it one two three four five six yes no and or with near behind front cat dog car bus man woman tree "
    "sky frame happens first last"
).split()
UNK = 96
BOS, EOS = 1, 2  # the tiny Llama's


def tiny_tokenizer(video_token: str = "<video>") -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny vocabulary: words split on whitespace and punctuation, each
    placeholder its tiny id (`video_token` names id 104: Video-LLaVA's and OneVision's "<video>", Qwen's
    "<|video_pad|>"); unknown words are "<unk>", and ids no word takes are "<extra_N>"."""
    words = list(WORDS) + [f"w{i}" for i in range(len(WORDS), len(TEXT_TOKENS))]
    assert len(set(words)) == len(TEXT_TOKENS), "the tiny tokenizer's words fill TEXT_TOKENS once each"
    special = {PAD: "<pad>", BOS: "<s>", EOS: "</s>", UNK: "<unk>", IMAGE_TOKEN: "<image>",
               QWEN_IMAGE_TOKEN: "<|image_pad|>", QWEN_VISION_START: "<|vision_start|>",
               QWEN_VISION_END: "<|vision_end|>", QWEN_VIDEO_TOKEN: video_token}
    assert VIDEO_TOKEN == QWEN_VIDEO_TOKEN  # one id, named per family
    names = {**dict(zip(TEXT_TOKENS, words)), **special}
    vocab = {names.get(i, f"<extra_{i}>"): i for i in range(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    placeholders = [special[i] for i in (IMAGE_TOKEN, QWEN_IMAGE_TOKEN, QWEN_VISION_START, QWEN_VISION_END,
                                         VIDEO_TOKEN)]
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=placeholders, padding_side="left",
    )


def has_torchvision() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def image_processor(name: str):
    """The stock image processor class `name`, or its PIL twin (`name` + "Pil") where torchvision is missing:
    transformers falls back to that twin itself, with a warning that the fallback is kept for backward
    compatibility only."""
    import transformers

    twin = name + "Pil"
    return getattr(transformers, twin if not has_torchvision() and hasattr(transformers, twin) else name)


class FramesVideoProcessor:
    """A video processor made of an image processor, where torchvision (which transformers' video processors
    need) is missing. Each frame goes through `frames`, the family's stock image processor; a Qwen video's
    temporal patch is its first frame's patches (as for an image), so its grid is (frames / temporal patch,
    h, w) as the stock video processor makes it, though its pixels differ."""

    model_input_names = ["pixel_values_videos", "video_grid_thw"]
    valid_kwargs = None

    # what a stock video processor states of its pixels (`vtprune show` reads them to draw the frames): the frames'
    PIXEL_SETTINGS = ("do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std", "patch_size")

    def __init__(self, frames, qwen: bool = False):
        self.frames, self.qwen = frames, qwen
        if qwen:
            self.merge_size, self.temporal_patch_size = frames.merge_size, frames.temporal_patch_size
        for name in self.PIXEL_SETTINGS:
            if hasattr(frames, name):
                setattr(self, name, getattr(frames, name))

    def __call__(self, videos, video_metadata=None, **kwargs) -> dict:
        from transformers.video_utils import VideoMetadata, make_batched_videos

        videos = make_batched_videos(videos)
        if not self.qwen:  # [videos, frames, 3, side, side]
            return {"pixel_values_videos": torch.stack([
                next(iter(self.frames(images=list(video), return_tensors="pt").values())) for video in videos])}
        rows, grids = [], []
        for video in videos:
            out = self.frames(images=list(video[:: self.temporal_patch_size]), return_tensors="pt")
            rows.append(out["pixel_values"])
            grids.append([len(out["image_grid_thw"]), *out["image_grid_thw"][0, 1:].tolist()])
        # Qwen2.5-VL's processor reads each video's frame rate here (the stock default: 24 fps when none is given)
        metadata = [VideoMetadata(**m) if isinstance(m, dict) else m for m in video_metadata] if video_metadata \
            else [VideoMetadata(total_num_frames=len(video)) for video in videos]
        return {"pixel_values_videos": torch.cat(rows), "video_grid_thw": torch.tensor(grids),
                "video_metadata": metadata}

    def to_dict(self) -> dict:
        return {"video_processor_type": type(self).__name__, "frames": self.frames.to_dict()}


def _build(cls, **parts):
    """cls(**parts): the stock processor, which accepts a FramesVideoProcessor as its video processor."""
    if not isinstance(parts.get("video_processor"), FramesVideoProcessor):
        return cls(**parts)
    stock = cls

    def check(self, name, argument):
        if name == "video_processor" and isinstance(argument, FramesVideoProcessor):
            return FramesVideoProcessor
        return stock.check_argument_for_proper_class(self, name, argument)

    return type(stock.__name__, (stock,), {"check_argument_for_proper_class": check})(**parts)


def _square(side: int) -> dict:
    return {"height": side, "width": side}


def _clip_images(model, cls):
    """A CLIP-style image processor: shortest edge resized to the tower's size, then centre-cropped square."""
    side = model.config.vision_config.image_size
    return cls(size={"shortest_edge": side}, crop_size=_square(side))


def llava_processor(model):
    from transformers import LlavaProcessor

    vision = model.config.vision_config
    return LlavaProcessor(
        image_processor=_clip_images(model, image_processor("CLIPImageProcessor")), tokenizer=tiny_tokenizer(),
        patch_size=vision.patch_size, vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's CLS token ("default" drops it again)
    )


def llava_next_processor(model):
    from transformers import LlavaNextProcessor

    config = model.config
    side = config.vision_config.image_size
    images = image_processor("LlavaNextImageProcessor")(size={"shortest_edge": side}, crop_size=_square(side),
                                     image_grid_pinpoints=config.image_grid_pinpoints)
    return LlavaNextProcessor(
        image_processor=images, tokenizer=tiny_tokenizer(), patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy, num_additional_image_tokens=1,
    )


def video_llava_processor(model):
    from transformers import VideoLlavaImageProcessor, VideoLlavaProcessor

    config = model.config
    side = config.vision_config.image_size
    images = _clip_images(model, VideoLlavaImageProcessor)
    if has_torchvision():
        from transformers import VideoLlavaVideoProcessor

        videos = VideoLlavaVideoProcessor(size={"shortest_edge": side}, crop_size=_square(side))
    else:
        videos = FramesVideoProcessor(images)
    return _build(
        VideoLlavaProcessor, image_processor=images, video_processor=videos, tokenizer=tiny_tokenizer(),
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # each frame's CLS token ("default" drops an image's)
    )


def llava_onevision_processor(model):
    from transformers import LlavaOnevisionProcessor

    config = model.config
    side, patch = config.vision_config.image_size, config.vision_config.patch_size
    if has_torchvision():
        from transformers import LlavaOnevisionVideoProcessor

        videos = LlavaOnevisionVideoProcessor(size=_square(side))
    else:  # the stock video processor resizes each frame to the tower's square
        videos = FramesVideoProcessor(image_processor("CLIPImageProcessor")(size=_square(side), do_center_crop=False))
    images = image_processor("LlavaOnevisionImageProcessor")(size=_square(side),
                                                             image_grid_pinpoints=config.image_grid_pinpoints)
    return _build(
        LlavaOnevisionProcessor, image_processor=images, tokenizer=tiny_tokenizer(), video_processor=videos,
        num_image_tokens=(side // patch) ** 2, vision_feature_select_strategy=config.vision_feature_select_strategy,
        vision_aspect_ratio=config.vision_aspect_ratio,
    )


def qwen_processor(model, min_pixels: int = 56 * 56, max_pixels: int = 112 * 112):
    """Qwen2-VL's or Qwen2.5-VL's processor: images and frames resized to multiples of patch x merge
    pixels, between `min_pixels` and `max_pixels` (a few 2x2-merged tokens each)."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor

    vision = model.config.vision_config
    geometry = dict(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                    temporal_patch_size=vision.temporal_patch_size,
                    size={"shortest_edge": min_pixels, "longest_edge": max_pixels})
    images = image_processor("Qwen2VLImageProcessor")(**geometry)
    if has_torchvision():
        from transformers import Qwen2VLVideoProcessor

        videos = Qwen2VLVideoProcessor(**geometry)
    else:
        videos = FramesVideoProcessor(images, qwen=True)
    cls = Qwen2_5_VLProcessor if model.config.model_type == "qwen2_5_vl" else Qwen2VLProcessor
    return _build(cls, image_processor=images, tokenizer=tiny_tokenizer("<|video_pad|>"), video_processor=videos)


PROCESSORS = {
    "LlavaForConditionalGeneration": llava_processor,
    "LlavaNextForConditionalGeneration": llava_next_processor,
    "VideoLlavaForConditionalGeneration": video_llava_processor,
    "LlavaOnevisionForConditionalGeneration": llava_onevision_processor,
    "Qwen2VLForConditionalGeneration": qwen_processor,
    "Qwen2_5_VLForConditionalGeneration": qwen_processor,
}


def tiny_processor(model):
    """The stock processor for a tiny model of `vtprune.tiny` (dispatched on the model's class)."""
    for cls in type(model).__mro__:
        if cls.__name__ in PROCESSORS:
            return PROCESSORS[cls.__name__](model)
    raise ValueError(f"no tiny processor for {type(model).__name__}; supported: {', '.join(PROCESSORS)}")
