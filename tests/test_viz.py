"""Kept-token pictures: the stage map, where merged tokens went, and the grid over the image the model saw."""

import shutil
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2VLImageProcessorPil

import vtprune
import vtprune.eval.generation
import vtprune.show
import vtprune.viz
from vtprune.cli import main
from vtprune.synth.reference import REFERENCE_DIR, load_reference
from vtprune.tiny import SampleLayout, tiny_inputs, tiny_llava, tiny_qwen2_vl, tiny_video_llava
from vtprune.viz import cell_index, dropped_at_stage, kept_token_map, merge_groups, seen_image, shade_dropped

from .conftest import FAMILIES
from .test_generation import templated

# (width, height): wide, tall, small square, and sides a multiple of 24 that still get cropped
SIZES = [(517, 300), (301, 777), (100, 100), (480, 360)]
needs_reference = pytest.mark.skipif(not (REFERENCE_DIR / "config.json").exists(), reason="no reference model shipped")


def photo(width: int, height: int) -> Image.Image:
    """A real photo (it ships with matplotlib), stretched to the size wanted."""
    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return Image.open(path).convert("RGB").resize((width, height), Image.BICUBIC)


@pytest.fixture(scope="module")
def reference():
    return load_reference()


def assert_grid_fits(seen, patch_px: int):
    """Every token's cell is exactly patch_px square and the cells tile the image."""
    rows, cols = seen.grid
    assert seen.image.size == (cols * patch_px, rows * patch_px)
    assert np.array_equal(cell_index(seen.image.height, rows), np.repeat(np.arange(rows), patch_px))
    assert np.array_equal(cell_index(seen.image.width, cols), np.repeat(np.arange(cols), patch_px))


def test_stage_map_marks_when_each_token_was_dropped():
    stages = dropped_at_stage((2, 3), [np.array([0, 1, 2, 4]), np.array([1, 4])])
    assert stages.tolist() == [[2, 0, 2], [1, 0, 1]]


def test_merge_groups_follow_chains_across_stages():
    # stage 1: 3 -> 1, 5 -> 4; stage 2: 4 -> 1 (so 5 ends in 1 too)
    moved = [(np.array([0, 1, 2, 3, 4, 5]), np.array([0, 1, 2, 1, 4, 4])),
             (np.array([0, 1, 2, 4]), np.array([0, 1, 2, 1]))]
    assert merge_groups(6, moved).tolist() == [0, 1, 2, 1, 1, 1]


def test_a_merging_method_records_where_every_dropped_token_went(tmp_path):
    model = tiny_llava()
    inputs = tiny_inputs(model, [SampleLayout()])
    start = int(torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id)[0])
    with torch.no_grad(), vtprune.apply(model, "clse_m", 8) as pruner:
        model(**inputs)
    decision = pruner.last_decision
    kept = [stage[0].numpy() - start for stage in decision.kept]
    moved = [(s[0][0].numpy() - start, s[0][1].numpy() - start) for s in decision.moved]
    for stage, (sources, targets) in enumerate(moved):
        survivors = np.arange(64) if stage == 0 else kept[stage - 1]
        assert sorted(sources.tolist()) == sorted(survivors.tolist())  # every token there went somewhere
        assert set(targets.tolist()) <= set(kept[stage].tolist())
    groups = merge_groups(64, moved)
    assert set(groups.tolist()) == set(kept[-1].tolist())
    image = np.random.default_rng(0).integers(0, 255, (56, 56, 3), dtype=np.uint8)
    from PIL import Image

    path = tmp_path / "kept.png"
    stages = kept_token_map(Image.fromarray(image), (8, 8), kept, path, "clse_m", decision.stage_layers, groups)
    assert path.stat().st_size > 0 and int((stages == 0).sum()) == len(kept[-1])


def test_shading_fills_exactly_the_cells_of_dropped_tokens():
    grid, patch = (3, 5), 14
    kept = [np.arange(0, 15, 2)]  # every other token survives
    stages = dropped_at_stage(grid, kept)
    white = np.ones((grid[0] * patch, grid[1] * patch, 3), dtype=np.float32)
    shaded = shade_dropped(white, stages, 1)
    blocks = shaded[..., 0].reshape(grid[0], patch, grid[1], patch)
    assert np.ptp(blocks, axis=(1, 3)).max() == 0  # one shade per cell: cell edges on patch edges
    assert np.array_equal(blocks[:, 0, :, 0] == 1, stages == 0)


def test_drawing_any_size_against_any_grid_does_not_crash(tmp_path):
    for width, height in SIZES:
        stages = kept_token_map(photo(width, height), (24, 24), [np.arange(0, 576, 9)], tmp_path / "k.png", "t")
        assert int((stages == 0).sum()) == 64


def test_indices_outside_the_grid_are_refused():
    with pytest.raises(ValueError, match="outside the 2x2"):
        dropped_at_stage((2, 2), [np.array([-1, 0])])


@needs_reference
@pytest.mark.parametrize("width,height", SIZES)
def test_llava_sees_the_resized_centre_crop(reference, width, height):
    _, processor = reference
    inputs = processor(images=[photo(width, height)], text=["<image>"], return_tensors="pt")
    seen = seen_image(processor, inputs)
    assert seen.grid == (24, 24)
    assert_grid_fits(seen, 14)
    # The rebuilt picture is the model's input: processing it again changes nothing.
    again = processor.image_processor(images=[seen.image], return_tensors="pt")["pixel_values"]
    assert torch.allclose(again, inputs["pixel_values"], atol=2 / 255 / 0.26)
    # Centre crop of the shortest-side resize, not the whole (squashed) photo.
    short = min(width, height)
    resized = photo(width, height).resize((round(width * 336 / short), round(height * 336 / short)), Image.BICUBIC)
    left, top = (resized.width - 336) // 2, (resized.height - 336) // 2
    crop = np.asarray(resized.crop((left, top, left + 336, top + 336)), np.float32)
    assert np.abs(np.asarray(seen.image, np.float32) - crop).mean() < 1  # a 1 px shift gives 4 or more


@pytest.mark.parametrize("width,height", SIZES)
def test_qwen2_vl_sees_the_image_resized_to_its_patch_grid(width, height):
    processor = Qwen2VLImageProcessorPil()  # defaults: patch 14, merge 2; nothing downloaded
    images = [photo(width, height), photo(width, height).transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    inputs = processor(images=images, return_tensors="pt")
    for index, image in enumerate(images):  # the second checks the offset into the concatenated patches
        _, rows, cols = inputs["image_grid_thw"][index].tolist()
        seen = seen_image(processor, inputs, index)
        assert seen.grid == (rows // 2, cols // 2)  # tokens after the 2x2 merge
        assert_grid_fits(seen, 28)
        expected = np.asarray(image.resize((cols * 14, rows * 14), Image.BICUBIC), np.int16)
        assert np.abs(np.asarray(seen.image, np.int16) - expected).max() <= 1


def test_a_qwen2_vl_picture_lines_up_with_its_kept_tokens(tmp_path):
    processor = Qwen2VLImageProcessorPil()
    features = processor(images=[photo(517, 300)], return_tensors="pt")
    _, rows, cols = features["image_grid_thw"][0].tolist()
    model = tiny_qwen2_vl()
    inputs = tiny_inputs(model, [SampleLayout(qwen_grid=(rows, cols))])
    inputs["pixel_values"] = features["pixel_values"]  # the tiny tower takes real patches of the same shape
    start = int(torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id)[0])
    with torch.no_grad(), vtprune.apply(model, "clse_m", 24) as pruner:
        model(**inputs)
    kept = [stage[0].numpy() - start for stage in pruner.last_decision.kept]
    seen = seen_image(processor, features)
    stages = kept_token_map(seen.image, seen.grid, kept, tmp_path / "kept.png", "qwen")
    assert stages.shape == seen.grid == (rows // 2, cols // 2)
    assert int((stages == 0).sum()) == len(kept[-1])


@needs_reference
@pytest.mark.parametrize("width,height", SIZES)
def test_show_answers_then_draws_on_what_the_model_saw(tmp_path, monkeypatch, capsys, width, height):
    photo(width, height).save(tmp_path / "photo.png")
    drawn = []
    draw = vtprune.viz.kept_token_maps

    def spy(drawings, *args, **options):
        drawn.extend((d.image.size, d.grid, capsys.readouterr().out) for d in drawings)
        return draw(drawings, *args, **options)

    monkeypatch.setattr(vtprune.viz, "kept_token_maps", spy)
    out = tmp_path / "pictures" / "kept.png"  # a folder that does not exist yet, made as calibrate's --out is
    assert main(["show", str(tmp_path / "photo.png"), "what colour is the tie ?", "--method", "clse_m",
                 "--budget", "64", "--out", str(out)]) == 0
    [(size, grid, printed_before)] = drawn
    assert size == (336, 336) and grid == (24, 24)
    assert "answer:" in printed_before  # an answer is out even if drawing fails
    assert out.stat().st_size > 0


@needs_reference
def test_show_asks_a_llava_checkpoint_without_a_chat_template_as_the_reference_model_was_trained(tmp_path, capsys):
    shutil.copytree(REFERENCE_DIR, tmp_path / "model", ignore=shutil.ignore_patterns("chat_template.jinja"))
    photo(300, 200).save(tmp_path / "photo.png")
    answers = []
    for model in (REFERENCE_DIR, tmp_path / "model"):
        assert main(["show", str(tmp_path / "photo.png"), "what colour is the circle ?", "--method", "fastv",
                     "--budget", "64", "--model", str(model), "--out", str(tmp_path / "kept.png")]) == 0
        answers.append(capsys.readouterr().out.splitlines()[0])
    assert answers[0] == answers[1] and answers[0].startswith("answer: ")


@needs_reference
def test_show_takes_a_method_with_options_as_eval_does(tmp_path, monkeypatch):
    photo(300, 200).save(tmp_path / "photo.png")
    drawn = []
    monkeypatch.setattr(vtprune.viz, "kept_token_maps",
                        lambda drawings, path, title, stage_layers, **_: drawn.append((title, stage_layers)))
    assert main(["show", str(tmp_path / "photo.png"), "what colour is the circle ?", "--method", "fastv:layer=1",
                 "--budget", "64", "--out", str(tmp_path / "kept.png")]) == 0
    [(title, stage_layers)] = drawn
    assert title.startswith("fastv:layer=1 @ 64: ") and stage_layers == [1]  # the default acts before layer 2
    with pytest.raises(SystemExit):
        main(["show", str(tmp_path / "photo.png"), "q ?", "--method", "fastv:depth=1"])


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_show_draws_a_qwen_checkpoints_kept_tokens_over_its_resized_image(tmp_path, monkeypatch, capsys, family):
    model = FAMILIES[family]("sdpa")
    processor = templated(model)
    model.save_pretrained(tmp_path / "qwen")
    # (the tiny processor's stand-in video processor, for machines without torchvision, cannot be saved)
    monkeypatch.setattr(vtprune.eval.generation, "load_checkpoint", lambda path: (model, processor))
    photo(517, 300).save(tmp_path / "photo.png")
    _, rows, cols = processor.image_processor(images=[photo(517, 300)], return_tensors="pt")["image_grid_thw"][0].tolist()
    drawn = []
    monkeypatch.setattr(vtprune.viz, "kept_token_maps",
                        lambda drawings, *rest, **options: drawn.extend((d.grid, d.kept_per_stage) for d in drawings))
    assert main(["show", str(tmp_path / "photo.png"), "what is it ?", "--method", "random", "--budget", "6",
                 "--model", str(tmp_path / "qwen"), "--max-new-tokens", "3", "--out", str(tmp_path / "kept.png")]) == 0
    [(grid, kept)] = drawn
    assert grid == (rows // 2, cols // 2)  # the 2x2-merged tokens of the image as the processor resized it
    assert len(kept[-1]) == 6 and all(0 <= i < grid[0] * grid[1] for stage in kept for i in stage)
    assert "answer:" in capsys.readouterr().out


def test_show_refuses_a_checkpoint_of_no_supported_family_before_loading(tmp_path, capsys):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "idefics2", "architectures": ["Idefics2Model"]}')
    photo(100, 100).save(tmp_path / "photo.png")
    with pytest.raises(SystemExit):
        main(["show", str(tmp_path / "photo.png"), "what ?", "--method", "random", "--model", str(tmp_path / "other")])
    assert "declares architectures ['Idefics2Model']; vtprune supports LlavaForConditionalGeneration, " \
           "LlavaNextForConditionalGeneration" in capsys.readouterr().err


def test_show_draws_a_video_llava_checkpoints_image(tmp_path, monkeypatch, capsys):
    model = tiny_video_llava("sdpa")
    processor = templated(model)
    model.save_pretrained(tmp_path / "video")
    monkeypatch.setattr(vtprune.eval.generation, "load_checkpoint", lambda path: (model, processor))
    photo(300, 200).save(tmp_path / "photo.png")
    drawn = []
    monkeypatch.setattr(vtprune.viz, "kept_token_maps",
                        lambda drawings, *rest, **options: drawn.extend((d.image.size, d.grid, d.kept_per_stage)
                                                                     for d in drawings))
    assert main(["show", str(tmp_path / "photo.png"), "what is it ?", "--method", "random", "--budget", "5",
                 "--model", str(tmp_path / "video"), "--out", str(tmp_path / "kept.png")]) == 0
    [(size, grid, kept)] = drawn
    assert size == (56, 56) and grid == (4, 4) and len(kept[-1]) == 5


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
@pytest.mark.parametrize("width,height", [(517, 300), (120, 333), (100, 100)])
def test_an_anyres_image_shows_its_base_view_and_its_unpadded_tiles(tmp_path, monkeypatch, capsys, family, width,
                                                                     height):
    """A white photo: the tiles, padded to the pinpoint's shape with black, are cropped to the rows and columns of
    patches the model keeps, so the high-resolution view is white where the stitched tiles have black bands."""
    from vtprune.adapters import adapter_for
    from vtprune.viz import seen_parts

    model = FAMILIES[family]("sdpa")
    processor = templated(model)
    model.save_pretrained(tmp_path / "model")
    monkeypatch.setattr(vtprune.eval.generation, "load_checkpoint", lambda path: (model, processor))
    white = Image.new("RGB", (width, height), "white")
    white.save(tmp_path / "photo.png")
    inputs = processor(images=[white], text=["<image>"], return_tensors="pt")
    adapter = adapter_for(model)
    [item] = adapter.visual_items(inputs["input_ids"], dict(inputs))[0]
    grids = [(grid.rows, grid.cols) for grid in item.parts]
    base, tiles = seen_parts(processor, inputs, grids, tiles=adapter.tile_grid(inputs["image_sizes"][0]))
    assert base.grid == (4, 4) and base.image.size == (56, 56)
    assert tiles.grid == grids[1]
    assert_grid_fits(tiles, 14)  # the tiny models' grids are below OneVision's anyres_max: not shrunk
    assert np.asarray(tiles.image).min() >= 250
    drawn = []
    draw = vtprune.viz.kept_token_maps
    monkeypatch.setattr(vtprune.viz, "kept_token_maps", lambda drawings, *rest, **options: drawn.append(drawings) or
                        draw(drawings, *rest, **options))
    assert main(["show", str(tmp_path / "photo.png"), "what is it ?", "--method", "divprune", "--budget", "6",
                 "--model", str(tmp_path / "model"), "--out", str(tmp_path / "kept.png")]) == 0
    [(base_drawn, tiles_drawn)] = drawn
    assert (base_drawn.grid, tiles_drawn.grid) == (base.grid, tiles.grid)
    kept = [len(d.kept_per_stage[-1]) for d in (base_drawn, tiles_drawn)]
    assert sum(kept) == 6 and all(0 <= i < d.grid[0] * d.grid[1] for d in (base_drawn, tiles_drawn)
                                  for i in d.kept_per_stage[-1])
    assert "over the 56x56 and" in capsys.readouterr().out and (tmp_path / "kept.png").stat().st_size > 0


def test_tokens_fall_in_their_grids_and_newlines_in_none():
    from vtprune.adapters.llava_next import anyres_item
    from vtprune.viz import groups_per_grid, tokens_per_grid

    item = anyres_item(10, 2, (2, 3))  # base 2x2 at 10-13, then rows 14-16 (newline 17) and 18-20 (newline 21)
    base, high = tokens_per_grid(item, [[10, 13, 14, 17, 20, 21, 3]])
    assert base[0].tolist() == [0, 3] and high[0].tolist() == [0, 5]
    # 20 (the high grid's last cell) merged into 11 (the base's second), then 11 into 10
    base_groups, high_groups = groups_per_grid(item, [([20], [11]), ([11], [10])])
    assert base_groups.tolist() == [0, 0, 2, 3] and high_groups.tolist() == [4, 5, 6, 7, 8, 0]
    # a move to a position outside the item (3: text) leaves the cell where it is, rather than in no group
    assert groups_per_grid(item, [([20], [3])])[1].tolist() == [4, 5, 6, 7, 8, 9]


def test_bad_input_is_one_line_not_a_traceback(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(SystemExit, match=r"^vtprune show: error: .*notes.png: not an image PIL can read; give a "
                                         r"picture \(.png, .jpg, ...\) or a video \(.mp4, "):
        main(["show", str(tmp_path / "notes.png"), "what colour is it ?", "--method", "random", "--budget", "8",
                  "--out", str(tmp_path / "kept.png")])
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "whole.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "whole.png").read_bytes()[:2000])  # a download cut short
    with pytest.raises(SystemExit, match=r"^vtprune show: error: .*cut.png: unreadable \(image file is truncated"):
        main(["show", str(tmp_path / "cut.png"), "what colour is it ?", "--method", "random", "--budget", "8",
              "--out", str(tmp_path / "kept.png")])


def test_a_onevision_grid_shrunk_past_anyres_max_is_drawn_over_the_whole_unpadded_image():
    """OneVision shrinks a high-resolution grid holding more than anyres_max_N tiles' worth: its tokens then cover the
    unpadded tiles in proportion (here 2 x 5 tokens over 6 x 12 patches' pixels)."""
    from vtprune.adapters import adapter_for
    from vtprune.adapters.llava_next import unpadded_grid
    from vtprune.tiny import tiny_llava_onevision
    from vtprune.viz import seen_parts

    model = tiny_llava_onevision("sdpa")
    model.config.vision_aspect_ratio = "anyres_max_1"
    processor = templated(model)
    inputs = processor(images=[photo(517, 300)], text=["<image>"], return_tensors="pt")
    adapter = adapter_for(model)
    [item] = adapter.visual_items(inputs["input_ids"], dict(inputs))[0]
    tiles = adapter.tile_grid(inputs["image_sizes"][0])
    rows, cols = unpadded_grid(tiles[0] * 4, tiles[1] * 4, inputs["image_sizes"][0])
    shrunk = (item.parts[1].rows, item.parts[1].cols)
    assert shrunk[0] * shrunk[1] < rows * cols
    _, high = seen_parts(processor, inputs, [(4, 4), shrunk], tiles=tiles)
    assert high.grid == shrunk and high.image.size == (cols * 14, rows * 14)


def test_tiles_are_stitched_from_the_pixels_their_patches_cover():
    """A tile whose side is no multiple of the patch (SigLIP's 384 px in 27 patches of 14) leaves its last pixels
    unseen: they are cut before stitching, so the next tile's cells start where its patches do."""
    from types import SimpleNamespace

    from vtprune.viz import seen_parts

    views = torch.stack([torch.full((3, 30, 30), 10.0 * (view + 1)) for view in range(5)])  # base, then 2 x 2 tiles
    views[..., 28:, :] = views[..., :, 28:] = 255.0  # the pixels no patch covers
    inputs = {"pixel_values": views[None], "image_sizes": torch.tensor([[100, 100]])}  # square: nothing unpadded
    plain = SimpleNamespace(image_processor=plain_processor())
    base, high = seen_parts(plain, inputs, [(4, 4), (8, 8)], tiles=(2, 2))  # 4 patches of 7 px a tile: 28 of 30
    assert base.image.size == (28, 28) and high.image.size == (56, 56)
    pixels = np.asarray(high.image)[..., 0]
    assert [pixels[0, 27], pixels[0, 28], pixels[28, 0], pixels[55, 55]] == [20, 30, 40, 50]
    assert np.asarray(base.image).max() == 10 and pixels.max() == 50  # the unseen pixels are cut, not the first ones


VIDEO_FAMILIES = ["video_llava", "llava_onevision", "qwen2_vl"]


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_a_videos_frames_are_drawn_as_the_model_saw_them(tmp_path, family):
    """Frame i of the file is uniformly grey 20 * i: each drawn frame is the one its tokens read (a Qwen2-VL token
    spans two frames, the first drawn), under the adapter's grid of a frame's tokens."""
    from vtprune.adapters import adapter_for
    from vtprune.eval.generation import batch_inputs
    from vtprune.eval.videos import read_frames
    from vtprune.viz import seen_frames

    from .test_loaders import write_video

    model = FAMILIES[family]("sdpa")
    processor = templated(model)
    frames = read_frames(write_video(tmp_path / "clip.mp4", frames=8, size=(64, 48)), 8)
    inputs = batch_inputs(processor, ["what happens ?"], [[]], [[frames]])
    [grid] = adapter_for(model).visual_items(inputs["input_ids"], dict(inputs))[0][0].parts
    seen = seen_frames(processor, inputs, (grid.frames, grid.rows, grid.cols), model.config.vision_config.patch_size)
    span = 2 if family == "qwen2_vl" else 1
    assert len(seen) == grid.frames == 8 // span
    for t, view in enumerate(seen):
        assert view.grid == (grid.rows, grid.cols)
        assert abs(np.asarray(view.image, np.float32).mean() - 20 * t * span) < 4
    patch = model.config.vision_config.patch_size
    with pytest.raises(ValueError, match=f"are not the model's {grid.frames + 1} frames"):
        seen_frames(processor, inputs, (grid.frames + 1, grid.rows, grid.cols), patch)
    for rows, cols in ((100, grid.cols), (grid.rows, 100)):
        with pytest.raises(ValueError, match="cannot draw them"):
            seen_frames(processor, inputs, (grid.frames, rows, cols), patch)


def test_kept_video_tokens_are_split_frame_by_frame():
    from vtprune.viz import kept_per_frame, per_frame

    # a 2-frame video of 2x3 tokens: raster index = frame * 6 + cell
    assert [[list(k) for k in frame] for frame in kept_per_frame([np.array([0, 5, 7, 11]), np.array([5, 11])], 2, 6)] \
        == [[[0, 5], [5]], [[1, 5], [5]]]
    assert [list(g) for g in per_frame(np.arange(12), 2)] == [list(range(6)), list(range(6, 12))]


@pytest.mark.parametrize("family,method", [("video_llava", "divprune"), ("llava_onevision", "clse_m"),
                                           ("qwen2_vl", "dart")])
def test_show_draws_each_frame_of_a_video(tmp_path, monkeypatch, capsys, family, method):
    from .test_loaders import write_video

    model = FAMILIES[family]("sdpa")
    processor = templated(model)
    model.save_pretrained(tmp_path / "model")
    monkeypatch.setattr(vtprune.eval.generation, "load_checkpoint", lambda path: (model, processor))
    write_video(tmp_path / "clip.mp4", frames=10, size=(64, 48))
    drawn = []
    draw = vtprune.viz.kept_token_maps
    monkeypatch.setattr(vtprune.viz, "kept_token_maps", lambda drawings, *rest, **options: drawn.append(
        (drawings, options)) or draw(drawings, *rest, **options))
    assert main(["show", str(tmp_path / "clip.mp4"), "what happens ?", "--method", method, "--budget", "10",
                 "--model", str(tmp_path / "model"), "--frames", "6", "--out", str(tmp_path / "kept.png")]) == 0
    [(drawings, options)] = drawn
    assert options == {"across": vtprune.show.FRAMES_TO_A_ROW} and len(drawings) == (3 if family == "qwen2_vl" else 6)
    # a Qwen2-VL token spans a temporal patch of two frames
    assert [d.label for d in drawings] == (["frames 1-2", "frames 3-4", "frames 5-6"] if family == "qwen2_vl"
                                           else [f"frame {t}" for t in range(1, 7)])
    assert sum(len(d.kept_per_stage[-1]) for d in drawings) == 10  # the budget, over the frames
    assert all(0 <= i < d.grid[0] * d.grid[1] for d in drawings for stage in d.kept_per_stage for i in stage)
    if method == "clse_m":  # each frame's tokens coloured by where they were merged, ids shared over the video
        assert all(d.groups is not None and d.groups.shape == (d.grid[0] * d.grid[1],) for d in drawings)
    assert f"over the {len(drawings)} frames of" in capsys.readouterr().out
    assert Image.open(tmp_path / "kept.png").size[0] > 0


def test_a_video_is_known_by_its_suffix_in_any_case():
    from types import SimpleNamespace

    with pytest.raises(ValueError, match=r"CLIP.MP4 is a video, but this checkpoint's processor"):
        vtprune.show.sample_of("CLIP.MP4", None, SimpleNamespace(video_processor=None), None)


def test_a_video_where_none_is_taken_and_frames_of_an_image_are_refused(tmp_path):
    from .test_loaders import write_video

    write_video(tmp_path / "clip.mp4")
    photo(100, 100).save(tmp_path / "photo.png")
    with pytest.raises(SystemExit, match=r"--frames samples a video's frames, and .*photo.png is no video"):
        main(["show", str(tmp_path / "photo.png"), "what ?", "--method", "random", "--frames", "4"])
    with pytest.raises(SystemExit, match=r"clip.mp4 is a video, but this checkpoint's processor \(LlavaProcessor\) "
                                         r"takes none; give --model a checkpoint of a family that does \(Video-LLaVA"):
        main(["show", str(tmp_path / "clip.mp4"), "what happens ?", "--method", "random", "--budget", "8",
              "--out", str(tmp_path / "kept.png")])


def plain_processor(**settings):
    """An image processor's pixel settings alone (what drawing reads), no normalisation unless given."""
    from types import SimpleNamespace

    return SimpleNamespace(**{"do_normalize": False, "do_rescale": False, **settings})


def test_a_non_square_crop_gets_a_grid_of_its_own_shape():
    from types import SimpleNamespace

    seen = seen_image(SimpleNamespace(patch_size=14, image_processor=plain_processor()),
                      {"pixel_values": torch.zeros(1, 3, 28, 56)})
    assert seen.grid == (2, 4) and seen.image.size == (56, 28)


def test_denormalising_gives_back_every_8_bit_value():
    """CLIP's normalisation in float32, undone: each of the 256 values comes back as itself, not one below it."""
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    processor = plain_processor(do_normalize=True, image_mean=mean, image_std=std, do_rescale=True,
                                rescale_factor=1 / 255)
    values = np.broadcast_to(np.arange(256, dtype=np.float32).reshape(1, 16, 16), (3, 16, 16))
    normalised = (values * np.float32(1 / 255) - np.float32(mean)[:, None, None]) / np.float32(std)[:, None, None]
    again = np.asarray(vtprune.viz._denormalise(normalised.astype(np.float32), processor))
    assert np.array_equal(again.transpose(2, 0, 1), values.astype(np.uint8))


def test_a_qwen_temporal_patch_is_drawn_from_its_first_frame():
    """Qwen2-VL packs a temporal patch's frames inside each patch (transformers' Qwen2-VL processors lay a row out as
    channel, frame, y, x, the rows block by merged block): frame 0 is drawn, not the one after it."""
    frames = np.stack([np.full((3, 28, 28), 10.0), np.full((3, 28, 28), 200.0)])  # one temporal patch, 2x2 patches
    rows = frames.reshape(1, 2, 3, 1, 2, 14, 1, 2, 14).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(4, -1)
    video_processor = plain_processor(patch_size=14, merge_size=2, temporal_patch_size=2)
    seen = vtprune.viz._seen_by_qwen2_vl(video_processor, torch.tensor(rows), torch.tensor([[1, 2, 2]]), 0)
    assert seen.grid == (1, 1) and np.unique(np.asarray(seen.image)).tolist() == [10]


@pytest.fixture
def figures(monkeypatch):
    """The figures kept_token_maps draws, kept open to be read until the test ends."""
    import matplotlib.pyplot as plt

    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", figures.append)
    yield figures
    for figure in figures:
        close(figure)


def test_the_picture_outlines_the_survivors_and_its_legend_shades_as_its_panel(tmp_path, figures):
    white = Image.new("RGB", (40, 30), "white")  # 3 x 4 cells of 10 px
    # stage 1 (before layer 2) drops 2, 3, 4, 7, 8, 9, 10; stage 2 (before layer 5) drops 0, 5, 6
    kept_token_map(white, (3, 4), [np.array([0, 1, 5, 6, 11]), np.array([1, 11])], tmp_path / "k.png", "t", [2, 5])
    [figure] = figures
    shaded = figure.axes[1]
    outlined = {(round((p.get_y() + 0.5) / 10), round((p.get_x() + 0.5) / 10)) for p in shaded.patches}
    assert outlined == {(0, 1), (2, 3)} and shaded.get_title() == "kept 2 of 12 tokens"
    pixels = shaded.get_images()[0].get_array()
    stage_1, stage_2, _ = figure.legends[0].legend_handles
    assert [t.get_text() for t in figure.legends[0].get_texts()] == [
        "dropped before LLM layer 2", "dropped before LLM layer 5", "kept to the end"]
    assert stage_1.get_facecolor()[0] == pytest.approx(pixels[5, 25, 0])  # cell (0, 2): dropped at stage 1
    assert stage_2.get_facecolor()[0] == pytest.approx(pixels[5, 5, 0])  # cell (0, 0): at stage 2
    assert pixels[5, 25, 0] < pixels[5, 5, 0] < pixels[5, 15, 0] == 1  # earlier drops darker; survivors untouched
    # one stage, a vision-encoder method's: its legend says where it acts
    kept_token_map(white, (3, 4), [np.array([1, 11])], tmp_path / "k.png", "t", [0])
    assert [t.get_text() for t in figures[-1].legends[0].get_texts()] == ["dropped before the LLM", "kept to the end"]


def test_merge_colours_are_the_same_in_every_drawing_and_frames_lie_in_even_rows(tmp_path, figures):
    from vtprune.viz import GridDrawing, kept_token_maps

    drawing = GridDrawing(Image.new("RGB", (20, 20), "white"), (2, 2), [np.array([0, 3])], np.array([0, 0, 3, 3]))
    for _ in range(2):
        kept_token_maps([drawing], tmp_path / "k.png", "t")
    first, second = (figure.axes[2].get_images()[0].get_array() for figure in figures)
    assert np.array_equal(first, second)
    kept_token_maps([drawing] * 10, tmp_path / "frames.png", "t", across=8)
    assert figures[-1].axes[0].get_gridspec().ncols == 5  # 10 frames as 5 and 5, not 8 and 2
