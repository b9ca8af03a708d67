"""Benchmark loaders (vtprune.eval.loaders): tiny fixtures in each on-disk format, the prompts lmms-eval
0.7.3 builds from them, the images, the references, and the official score on hand-written answers."""

import base64
import csv
import io
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vtprune.eval.loaders import TASKS, BenchmarkSample, load_benchmark
from vtprune.eval.metrics import MME_SUBTASKS, score

SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


# --- fixture writers ------------------------------------------------------------------------------------

def png(color=RED, size=(4, 3), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else 128).save(buf, format="PNG")
    return buf.getvalue()


def hf_image(color=RED, size=(4, 3), mode="RGB") -> dict:
    """An HF Image feature cell as parquet / arrow store it."""
    return {"bytes": png(color, size, mode), "path": None}


def write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def save_to_disk(folder, rows, split=None):
    """What datasets' Dataset.save_to_disk writes: Arrow streaming shards + state.json + dataset_info.json."""
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table)
    (folder / "state.json").write_text(json.dumps(
        {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": split, "_fingerprint": "x"}))
    (folder / "dataset_info.json").write_text("{}")
    return folder


def color_of(image):
    return image.convert("RGB").getpixel((0, 0))


def check_samples(samples, task):
    assert all(isinstance(s, BenchmarkSample) and s.task == task for s in samples)
    assert len({s.id for s in samples}) == len(samples)
    for s in samples:
        for im in s.images:
            assert im.mode == "RGB"


# --- (a) lmms-eval / HF parquet copies -------------------------------------------------------------------

def pope_rows():
    return [
        {"question_id": "1", "question": "Is there a dog in the image?", "answer": "yes",
         "category": "adversarial", "image": hf_image(RED), "image_source": "COCO_val2014_1"},
        {"question_id": "2", "question": "Is there a cat in the image? ", "answer": "no",
         "category": "adversarial", "image": hf_image(GREEN), "image_source": "COCO_val2014_2"},
        {"question_id": "1", "question": "Is there a car in the image?", "answer": "yes",
         "category": "random", "image": hf_image(BLUE), "image_source": "COCO_val2014_3"},
        {"question_id": "2", "question": "Is there a bus in the image?", "answer": "no",
         "category": "random", "image": hf_image(RED, (5, 5)), "image_source": "COCO_val2014_4"},
    ]


def test_pope_parquet_snapshot_picks_the_test_split(tmp_path):
    write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", pope_rows())
    # the Full config's per-split files sit beside it in a hub snapshot; lmms-eval's `pope` reads test only
    write_parquet(tmp_path / "Full" / "adversarial-00000-of-00001.parquet", pope_rows()[:1])
    samples = load_benchmark("pope", tmp_path)
    check_samples(samples, "pope")
    assert [s.id for s in samples] == ["adversarial/1", "adversarial/2", "random/1", "random/2"]
    assert samples[1].question == "Is there a cat in the image?" + SHORT  # stripped, then the post prompt
    assert [color_of(s.images[0]) for s in samples[:3]] == [RED, GREEN, BLUE]
    assert samples[3].images[0].size == (5, 5)
    assert samples[0].reference == {"answer": "yes", "category": "adversarial"}
    # lmms-eval: pooled TP=1 (row 0), FP=1 (row 1), FN=1 (row 2), TN=1 -> precision = recall = F1 = 0.5
    result = score("pope", ["yes", "Yes", "no", "no"], [s.reference for s in samples])
    assert result["score"] == pytest.approx(50.0)
    assert result["adversarial/accuracy"] == pytest.approx(0.5)


def test_parquet_converter_layout_names_the_split_by_folder(tmp_path):
    write_parquet(tmp_path / "default" / "test" / "0000.parquet", pope_rows()[:2])
    write_parquet(tmp_path / "Full" / "adversarial" / "0000.parquet", pope_rows())
    assert [s.id for s in load_benchmark("pope", tmp_path)] == ["adversarial/1", "adversarial/2"]


def test_limit_keeps_the_first_samples(tmp_path):
    write_parquet(tmp_path / "pope.parquet", pope_rows())
    samples = load_benchmark("pope", tmp_path / "pope.parquet", limit=2)
    assert [s.question for s in samples] == ["Is there a dog in the image?" + SHORT,
                                             "Is there a cat in the image?" + SHORT]


def gqa_snapshot(root, image_rows=None):
    questions = [
        {"id": "q1", "imageId": "img1", "question": "What color is the car?", "answer": "red", "fullAnswer": "x"},
        {"id": "q2", "imageId": "img2", "question": "Is it sunny?", "answer": "no", "fullAnswer": "x"},
        {"id": "q3", "imageId": "img1", "question": "Which side is the tree on?", "answer": "left",
         "fullAnswer": "x"},
    ]
    write_parquet(root / "testdev_balanced_instructions" / "testdev-00000-of-00001.parquet", questions)
    write_parquet(root / "train_balanced_instructions" / "train-00000-of-00001.parquet",
                  [{**questions[0], "question": "a training question"}])
    if image_rows is None:
        image_rows = [{"id": "img1", "image": hf_image(RED)}, {"id": "img2", "image": hf_image(BLUE)},
                      {"id": "img9", "image": hf_image(GREEN)}]
    if image_rows:
        write_parquet(root / "testdev_balanced_images" / "testdev-00000-of-00001.parquet", image_rows)


def test_gqa_parquet_joins_questions_to_images(tmp_path):
    gqa_snapshot(tmp_path)
    samples = load_benchmark("gqa", tmp_path)
    check_samples(samples, "gqa")
    assert [s.id for s in samples] == ["q1", "q2", "q3"]
    assert samples[0].question == "What color is the car?" + SHORT
    assert [color_of(s.images[0]) for s in samples] == [RED, BLUE, RED]
    assert [s.reference for s in samples] == [{"answer": "red"}, {"answer": "no"}, {"answer": "left"}]
    # lmms-eval exact match after lowercasing and removing punctuation: "Red." right, "yes" wrong, "left" right
    assert score("gqa", ["Red.", "yes", "left"], [s.reference for s in samples])["score"] == pytest.approx(200 / 3)


def mmbench_row(index, question, options, answer, hint=None, image=RED):
    row = {"index": index, "question": question, "hint": hint, "answer": answer, "category": "cat_a",
           "L2-category": "l2_a", "source": "src", "split": "dev", "image": hf_image(image), "comment": None}
    for letter in "ABCD":
        row[letter] = options.get(letter)
    return row


def mmbench_question(index, question, options, gold, hint=None, image=RED):
    """A question's rows as MMBench's dev files hold them: one per rotation of its options (index + k x 1e6)."""
    rows = []
    for k in range(len(options)):
        shifted = options[k:] + options[:k]
        rows.append(mmbench_row(index + k * 1_000_000, question, dict(zip("ABCD", shifted)),
                                "ABCD"[shifted.index(gold)], hint, image))
    return rows


def originals_first(*questions):
    """Rows in MMBench's file order: every question's original, then every first rotation, ..."""
    return sorted((row for rows in questions for row in rows), key=lambda row: row["index"] // 1_000_000)


def test_mmbench_en_and_cn_from_one_snapshot(tmp_path):
    en = originals_first(mmbench_question(0, "What is shown?", ["cat", "dog"], "cat"),
                         mmbench_question(1, "Which is larger?", ["sun", "moon", "earth"], "sun", hint="Look closely."))
    cn = mmbench_question(0, "图中是什么？", ["猫", "狗"], "猫", image=GREEN)
    write_parquet(tmp_path / "en" / "dev-00000-of-00001.parquet", en)
    write_parquet(tmp_path / "en" / "test-00000-of-00001.parquet", [{**en[0], "answer": None}])
    write_parquet(tmp_path / "cn" / "dev-00000-of-00001.parquet", cn)
    samples = load_benchmark("mmbench_en", tmp_path)
    check_samples(samples, "mmbench_en")
    assert [s.id for s in samples] == ["0", "1", "1000000", "1000001", "2000001"]
    # en_utils: "{hint} {question} {options}", then "\n" + a post prompt that itself starts with "\n"
    assert samples[0].question == "What is shown? There are several options:\nA. cat\nB. dog\n" + LETTER
    assert samples[1].question == ("Look closely. Which is larger? There are several options:\nA. sun\nB. moon\n"
                                   "C. earth\n" + LETTER)
    assert samples[1].reference == {"index": 1, "answer": "A", "A": "sun", "B": "moon", "C": "earth", "D": None,
                                    "category": "cat_a", "L2-category": "l2_a"}
    # circular: question 0 needs both rotations right (its second, gold B, is wrong), question 1 is right -> 1 of 2
    result = score("mmbench_en", ["A", "A", "A", "C", "B"], [s.reference for s in samples])
    assert result["score"] == pytest.approx(50.0) and result["n_questions"] == 2
    cn_samples = load_benchmark("mmbench_cn", tmp_path)
    assert len(cn_samples) == 2 and color_of(cn_samples[0].images[0]) == GREEN
    assert cn_samples[0].question == "图中是什么？ There are several options:\nA. 猫\nB. 狗\n\n请直接使用所提供的选项字母作为答案回答。"
    assert score("mmbench_cn", ["B", "A"], [s.reference for s in cn_samples])["score"] == 0.0


def test_mmbench_configs_saved_to_disk_are_told_apart_by_their_folders(tmp_path):
    save_to_disk(tmp_path / "en", mmbench_question(0, "What is shown?", ["cat", "dog"], "cat"), split="dev")
    save_to_disk(tmp_path / "cn", mmbench_question(0, "图中是什么？", ["猫", "狗"], "猫", image=GREEN), split="dev")
    assert [color_of(s.images[0]) for s in load_benchmark("mmbench_cn", tmp_path)] == [GREEN, GREEN]
    assert [s.question[:14] for s in load_benchmark("mmbench_en", tmp_path)] == ["What is shown?"] * 2


def mme_rows():
    return [
        {"question_id": "code_reasoning/0020.png", "question": "Is the output 3? Please answer yes or no.",
         "answer": "Yes", "category": "code_reasoning", "image": hf_image(RED)},
        {"question_id": "code_reasoning/0020.png", "question": "Is the output 4? Please answer yes or no.",
         "answer": "No", "category": "code_reasoning", "image": hf_image(RED)},
        {"question_id": "color/0001.jpg", "question": "Is the car red? Please answer yes or no.",
         "answer": "Yes", "category": "color", "image": hf_image(BLUE)},
        {"question_id": "color/0001.jpg", "question": "Is the car blue? Please answer yes or no.",
         "answer": "No", "category": "color", "image": hf_image(BLUE)},
        {"question_id": "color/0002.jpg", "question": "Is it green? Please answer yes or no.",
         "answer": "No", "category": "color", "image": hf_image(GREEN)},
    ]


def test_shards_named_with_a_hash_are_one_split(tmp_path):
    """lmms-lab/MME's and VizWiz-VQA's shards carry a hash after their number: still one split, checked whole."""
    write_parquet(tmp_path / "data" / "test-00000-of-00002-a25dbe3b44c4fda6.parquet", mme_rows()[:2])
    write_parquet(tmp_path / "data" / "test-00001-of-00002-7b1e5c0a99d3f2e4.parquet", mme_rows()[2:])
    assert len(load_benchmark("mme", tmp_path)) == len(mme_rows())
    (tmp_path / "data" / "test-00001-of-00002-7b1e5c0a99d3f2e4.parquet").unlink()
    raises(re.escape("split 'test' has 1 of its 2 shards (test-00001-of-00002 missing)"), load_benchmark, "mme",
           tmp_path)


def test_mme_parquet_limit_keeps_question_pairs(tmp_path):
    write_parquet(tmp_path / "data" / "test-00000-of-00002.parquet", mme_rows()[:2])
    write_parquet(tmp_path / "data" / "test-00001-of-00002.parquet", mme_rows()[2:])
    samples = load_benchmark("mme", tmp_path, limit=3)  # 3 would split color/0001.jpg's pair: 4 come back
    check_samples(samples, "mme")
    assert [s.id for s in samples] == ["code_reasoning/0020.png#1", "code_reasoning/0020.png#2",
                                       "color/0001.jpg#1", "color/0001.jpg#2"]
    # " Please answer yes or no." is replaced by the default post prompt
    assert samples[0].question == "Is the output 3?" + SHORT
    assert samples[2].reference == {"question_id": "color/0001.jpg", "category": "color", "answer": "Yes"}
    # code_reasoning: acc 100 + acc+ 100 (cognition 200); color: acc 50 + acc+ 0 (perception 50)
    result = score("mme", ["Yes", "No", "Yes", "Yes"], [s.reference for s in samples])
    assert (result["cognition"], result["perception"], result["score"]) == (200.0, 50.0, 250.0)


def test_an_mme_row_without_a_category_takes_its_subtask_from_its_question_id(tmp_path):
    write_parquet(tmp_path / "mme.parquet", [{k: v for k, v in row.items() if k != "category"} for row in mme_rows()])
    assert [s.reference["category"] for s in load_benchmark("mme", tmp_path)] == [
        "code_reasoning", "code_reasoning", "color", "color", "color"]


def sqa_rows():
    return [
        {"question": "Which animal is a mammal?", "choices": ["frog", "whale"], "answer": 1, "hint": "",
         "image": hf_image(RED), "subject": "natural science"},
        {"question": "What is the capital of France?", "choices": ["Paris", "Rome", "Berlin"], "answer": 0,
         "hint": "Look at the map.", "image": hf_image(BLUE), "subject": "social science"},
    ]


def test_scienceqa_img_parquet_snapshot(tmp_path):
    write_parquet(tmp_path / "ScienceQA-IMG" / "test-00000-of-00001.parquet", sqa_rows())
    write_parquet(tmp_path / "ScienceQA-FULL" / "test-00000-of-00001.parquet", sqa_rows()[:1])
    samples = load_benchmark("scienceqa_img", tmp_path)
    check_samples(samples, "scienceqa_img")
    assert [s.id for s in samples] == ["0", "1"]
    assert samples[0].question == "Which animal is a mammal?\nA. frog\nB. whale" + LETTER
    assert samples[1].question == ("Context: Look at the map.\nWhat is the capital of France?\nA. Paris\nB. Rome\n"
                                   "C. Berlin" + LETTER)
    assert samples[1].reference == {"choices": ["Paris", "Rome", "Berlin"], "answer": 0}
    assert score("scienceqa_img", ["B", "C. Berlin"], [s.reference for s in samples])["score"] == 50.0


def test_ocrbench_single_parquet_file(tmp_path):
    rows = [{"dataset": "IIIT5K", "question": "what is written in the image? ", "question_type":
             "Regular Text Recognition", "answer": ["CENTRE"], "image": hf_image(RED)},
            {"dataset": "HME100k", "question": "Write the formula.", "question_type":
             "Handwritten Mathematical Expression Recognition", "answer": ["x^2 + 1"], "image": hf_image(BLUE)}]
    file = write_parquet(tmp_path / "test-00000-of-00001.parquet", rows)
    samples = load_benchmark("ocrbench", file)
    check_samples(samples, "ocrbench")
    assert samples[0].question == "what is written in the image?"  # stripped, no post prompt
    assert samples[1].reference == {"answer": ["x^2 + 1"], "dataset": "HME100k",
                                    "question_type": "Handwritten Mathematical Expression Recognition"}
    # "centre" is in the lowercased answer; HME100k compares without spaces, and "x^2" lacks "+1"
    assert score("ocrbench", ["The text is centre.", "x ^ 2"], [s.reference for s in samples])["score"] == 1.0


# --- (b) datasets.save_to_disk folders -------------------------------------------------------------------

def test_textvqa_save_to_disk_dataset_dict(tmp_path):
    val = [{"question_id": 10, "question": "what is the BRAND name?", "image": hf_image(RED),
            "answers": ["Coca Cola"] * 7 + ["coke"] * 3, "ocr_tokens": ["coca"]},
           {"question_id": 11, "question": "what does the sign say?", "image": hf_image(GREEN),
            "answers": ["stop"] * 2 + ["halt"] * 8, "ocr_tokens": []}]
    save_to_disk(tmp_path / "validation", val)
    save_to_disk(tmp_path / "train", [{**val[0], "question_id": 99}])
    (tmp_path / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation"]}))
    samples = load_benchmark("textvqa", tmp_path)
    check_samples(samples, "textvqa")
    assert [s.id for s in samples] == ["10", "11"]
    assert samples[0].question == "What is the brand name?" + SHORT  # str.capitalize, as lmms-eval
    assert color_of(samples[1].images[0]) == GREEN
    # row 1: 7 matches -> 1.0; row 2: "stop" twice among 10 -> (2 * 1/3 + 8 * 2/3) / 10 = 0.6; mean 0.8
    refs = [s.reference for s in samples]
    assert score("textvqa", ["coca cola", "Stop"], refs)["score"] == pytest.approx(80.0)
    assert score("textvqa", ["coca cola", "Stop"], refs, scoring="llava")["score"] == pytest.approx(80.0)


def test_a_textvqa_copy_is_not_read_as_vizwiz_nor_the_reverse(tmp_path):
    """The two share a scoring rule and most columns: each other's rows would be asked with the wrong prompt."""
    textvqa = {"question_id": 10, "question": "what is the brand?", "image": hf_image(RED),
               "answers": ["coke"] * 10, "ocr_tokens": ["coca"], "set_name": "val"}
    vizwiz = {"question_id": "VizWiz_val_00000000.jpg", "question": "what is this?",
              "answers": ["unanswerable"] * 10, "category": "unanswerable", "image": hf_image(BLUE)}
    save_to_disk(tmp_path / "copy_a", [textvqa], split="validation")
    save_to_disk(tmp_path / "copy_b", [vizwiz], split="val")
    with pytest.raises(ValueError, match="field 'ocr_tokens' is a column of TextVQA's rows.*copy of TextVQA"):
        load_benchmark("vizwiz", tmp_path / "copy_a")
    with pytest.raises(ValueError, match="field 'category' is a column of VizWiz-VQA's rows.*point TextVQA"):
        load_benchmark("textvqa", tmp_path / "copy_b")
    assert len(load_benchmark("textvqa", tmp_path / "copy_a")) == len(load_benchmark("vizwiz", tmp_path / "copy_b")) == 1


def test_vizwiz_save_to_disk_dataset_converts_grayscale(tmp_path):
    rows = [{"question_id": "VizWiz_val_00000000.jpg", "question": "what is this?", "answers": ["unanswerable"] * 10,
             "category": "unanswerable", "image": hf_image(mode="L")},
            {"question_id": "VizWiz_val_00000001.jpg", "question": "what is in the can?",
             "answers": ["soup"] * 3 + ["can"] * 7, "category": "other", "image": hf_image(BLUE)}]
    save_to_disk(tmp_path / "vizwiz_val", rows, split="val")
    samples = load_benchmark("vizwiz", tmp_path / "vizwiz_val")
    check_samples(samples, "vizwiz")
    assert samples[0].images[0].getpixel((0, 0)) == (128, 128, 128)  # "L" converted to RGB
    assert samples[0].question == ("What is this?\nWhen the provided information is insufficient, respond with "
                                   "'Unanswerable'." + SHORT)
    assert samples[1].reference == {"answers": ["soup"] * 3 + ["can"] * 7, "category": "other"}
    # row 1: 1.0; row 2: "soup" 3 times -> (3 * 2/3 + 7 * 1) / 10 = 0.9; mean 0.95
    result = score("vizwiz", ["Unanswerable", "soup"], [s.reference for s in samples])
    assert result["score"] == pytest.approx(95.0)
    assert result["unanswerable/accuracy"] == pytest.approx(1.0)


def test_arrow_file_in_random_access_format(tmp_path):
    table = pa.Table.from_pylist(sqa_rows())
    with pa.OSFile(str(tmp_path / "sqa.arrow"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    samples = load_benchmark("scienceqa_img", tmp_path / "sqa.arrow")
    assert [s.reference["answer"] for s in samples] == [1, 0] and color_of(samples[1].images[0]) == BLUE


def test_datasets_cache_folder(tmp_path):
    """What lmms-eval leaves behind: ~/.cache/huggingface/datasets/<org>___<name>/<config>/<ver>/<hash>/*.arrow"""
    folder = tmp_path / "lmms-lab___pope" / "default" / "0.0.0" / "abc123"
    save_to_disk(folder, pope_rows()[:3])
    (folder / "state.json").unlink()  # the cache has no state.json; its shards are named <name>-<split>-...
    (folder / "data-00000-of-00001.arrow").rename(folder / "pope-test-00000-of-00001.arrow")
    save_to_disk(tmp_path / "other", pope_rows())
    (tmp_path / "other" / "state.json").unlink()
    (tmp_path / "other" / "data-00000-of-00001.arrow").rename(tmp_path / "other" / "pope-train-00000-of-00001.arrow")
    assert [s.id for s in load_benchmark("pope", tmp_path)] == ["adversarial/1", "adversarial/2", "random/1"]


def test_gqa_from_two_save_to_disk_folders(tmp_path):
    save_to_disk(tmp_path / "instructions" / "testdev",
                 [{"id": "q1", "imageId": "img1", "question": "Is it red?", "answer": "yes"}])
    (tmp_path / "instructions" / "dataset_dict.json").write_text(json.dumps({"splits": ["testdev"]}))
    save_to_disk(tmp_path / "images", [{"id": "img1", "image": hf_image(GREEN)}], split="testdev")
    [sample] = load_benchmark("gqa", tmp_path)
    assert sample.question == "Is it red?" + SHORT and color_of(sample.images[0]) == GREEN


# --- (c) LLaVA's evaluation files ------------------------------------------------------------------------

def write_image(path, color=RED, size=(4, 3)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="PNG")  # lossless whatever the name, so colours compare exactly
    return path


def pope_llava(root):
    lines = {"adversarial": [("Is there a cup in the image?", "no", GREEN)],
             "popular": [("Is there a dog in the image?", "yes", RED), ("Is there a cat in the image?", "no", RED)],
             "random": [("Is there a car in the image?", "yes", BLUE), ("Is there a bus in the image?", "no", BLUE)]}
    (root / "coco").mkdir(parents=True)
    for split, qs in lines.items():
        with open(root / "coco" / f"coco_pope_{split}.json", "w") as f:
            for qid, (text, label, color) in enumerate(qs, 1):
                image = f"COCO_val2014_{split}.jpg"
                write_image(root / "val2014" / image, color)
                f.write(json.dumps({"question_id": qid, "image": image, "text": text, "label": label}) + "\n")


def test_pope_llava_coco_files(tmp_path):
    pope_llava(tmp_path)
    samples = load_benchmark("pope", tmp_path)
    check_samples(samples, "pope")
    assert [s.id for s in samples] == ["adversarial/1", "popular/1", "popular/2", "random/1", "random/2"]
    assert samples[3].question == "Is there a car in the image?" + SHORT
    assert [color_of(s.images[0]) for s in samples] == [GREEN, RED, RED, BLUE, BLUE]
    assert samples[2].reference == {"answer": "no", "category": "popular"}
    # llava: adversarial has no "yes" said or expected (F1 0); popular all right (F1 1); random: gold yes read
    # as no, gold no as no (F1 0); mean over splits 1/3
    preds = ["No.", "Yes, there is.", "No.", "There is not.", "no"]
    assert score("pope", preds, [s.reference for s in samples], scoring="llava")["score"] == pytest.approx(100 / 3)


def test_pope_llava_files_missing_a_split_are_refused(tmp_path):
    """POPE's score is the mean over its three splits: a copy with two would be scored as if it were whole."""
    pope_llava(tmp_path)
    (tmp_path / "coco" / "coco_pope_adversarial.json").unlink()
    raises(re.escape("has coco_pope_popular.json, coco_pope_random.json but not coco_pope_adversarial.json; POPE's "
                     "score is the mean over its three splits"), load_benchmark, "pope", tmp_path)
    raises(re.escape("has coco_pope_random.json but not coco_pope_adversarial.json, coco_pope_popular.json"),
           load_benchmark, "pope", tmp_path / "coco" / "coco_pope_random.json")


def test_pope_same_question_in_parquet_and_llava_files(tmp_path):
    pope_llava(tmp_path / "llava")
    write_parquet(tmp_path / "hf" / "pope.parquet", pope_rows())
    assert load_benchmark("pope", tmp_path / "llava")[1].question == load_benchmark("pope", tmp_path / "hf")[0].question


def test_gqa_llava_question_file(tmp_path):
    questions = {"201": {"imageId": "n1", "question": "Is it red?", "answer": "yes", "fullAnswer": "Yes, it is."},
                 "202": {"imageId": "n2", "question": "What color is it?", "answer": "red", "fullAnswer": "x"}}
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "testdev_balanced_questions.json").write_text(json.dumps(questions))
    write_image(tmp_path / "data" / "images" / "n1.jpg", RED)
    write_image(tmp_path / "data" / "images" / "n2.jpg", BLUE, (6, 6))
    samples = load_benchmark("gqa", tmp_path)
    check_samples(samples, "gqa")
    assert [s.id for s in samples] == ["201", "202"]
    assert samples[1].question == "What color is it?" + SHORT and samples[1].images[0].size == (6, 6)
    # llava rule: trailing periods dropped, lowercased; "blue" is wrong
    assert score("gqa", ["Yes.", "blue"], [s.reference for s in samples], scoring="llava")["score"] == 50.0


def test_textvqa_llava_annotation_file(tmp_path):
    data = {"dataset_name": "textvqa", "data": [
        {"question_id": 34602, "image_id": "abc", "question": "what is the brand of this camera?",
         "answers": ["nous les gosses"] * 4 + ["dakota"] * 6}]}
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps(data))
    write_image(tmp_path / "train_images" / "abc.jpg", GREEN)
    [sample] = load_benchmark("textvqa", tmp_path)
    assert sample.id == "34602" and sample.question == "What is the brand of this camera?" + SHORT
    assert color_of(sample.images[0]) == GREEN
    # "dakota" 6 times among 10 -> every leave-one-out subset has >= 5 matches -> 1.0
    assert score("textvqa", ["Dakota"], [sample.reference], scoring="llava")["score"] == pytest.approx(100.0)


def sqa_llava(root):
    problems = {
        "1": {"question": "Which animal is a mammal?", "choices": ["frog", "whale"], "answer": 1,
              "hint": "Whales live in the sea.", "image": "image.png", "split": "test"},
        "2": {"question": "Which word rhymes?", "choices": ["cat", "dog"], "answer": 0, "hint": "", "image": None,
              "split": "test"},
        "3": {"question": "train question", "choices": ["a", "b"], "answer": 0, "hint": "", "image": "image.png",
              "split": "train"},
    }
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps({"test": ["1", "2"], "train": ["3"]}))
    write_image(root / "images" / "test" / "1" / "image.png", BLUE)


def test_scienceqa_llava_problems_keep_test_questions_with_images(tmp_path):
    sqa_llava(tmp_path)
    [sample] = load_benchmark("scienceqa_img", tmp_path)
    assert sample.id == "1"
    assert sample.question == "Context: Whales live in the sea.\nWhich animal is a mammal?\nA. frog\nB. whale" + LETTER
    assert color_of(sample.images[0]) == BLUE
    assert score("scienceqa_img", ["B. whale"], [sample.reference], scoring="llava")["score"] == 100.0


def b64(color):
    return base64.b64encode(png(color)).decode()


TSV_HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
              "l2-category", "comment", "split"]


def write_tsv(path, rows):
    path.write_text("\n".join("\t".join(r) for r in [TSV_HEADER, *rows]) + "\n", encoding="utf-8")


# two questions, every rotation, originals first; VLMEvalKit TSVs store a repeated image once: a rotation's image
# cell holds the index of the row that has it
MMBENCH_TSV_ROWS = [
    ["0", "What is shown?", "", "cat", "dog", "", "", "A", "c1", b64(RED), "s", "l2", "", "dev"],
    ["2", "Which one?", "A hint.", "x", "y", "z", "", "C", "c2", b64(BLUE), "s", "l2b", "", "dev"],
    ["1000000", "What is shown?", "", "dog", "cat", "", "", "B", "c1", "0", "s", "l2", "", "dev"],
    ["1000002", "Which one?", "A hint.", "y", "z", "x", "", "B", "c2", "2", "s", "l2b", "", "dev"],
    ["2000002", "Which one?", "A hint.", "z", "x", "y", "", "A", "c2", "2", "s", "l2b", "", "dev"],
]


def test_mmbench_tsv_with_base64_images(tmp_path):
    write_tsv(tmp_path / "mmbench_dev_20230712.tsv", MMBENCH_TSV_ROWS)
    write_tsv(tmp_path / "mmbench_dev_cn_20231003.tsv", [
        ["0", "哪个？", "", "甲", "乙", "", "", "B", "c1", b64(GREEN), "s", "l2", "", "dev"],
        ["1000000", "哪个？", "", "乙", "甲", "", "", "A", "c1", "0", "s", "l2", "", "dev"]])
    samples = load_benchmark("mmbench_en", tmp_path)
    check_samples(samples, "mmbench_en")
    assert [s.id for s in samples] == ["0", "2", "1000000", "1000002", "2000002"]
    assert [color_of(s.images[0]) for s in samples] == [RED, BLUE, RED, BLUE, BLUE]
    assert samples[0].question == "What is shown? There are several options:\nA. cat\nB. dog\n" + LETTER
    assert samples[1].question.startswith("A hint. Which one? There are several options:\nA. x\nB. y\nC. z\n")
    assert samples[1].reference["L2-category"] == "l2b" and samples[0].reference["C"] is None
    result = score("mmbench_en", ["A", "The answer is C", "B", "B", "A"], [s.reference for s in samples])
    assert result["score"] == 100.0
    cn = load_benchmark("mmbench_cn", tmp_path)[0]
    assert cn.question.startswith("哪个？ There are several options:\nA. 甲\nB. 乙") and color_of(cn.images[0]) == GREEN


def mme_release(root):
    """MME's release folder: artwork and code_reasoning as the tests read them, each other subtask one image."""
    release = root / "MME_Benchmark_release_version"
    for kind in MME_SUBTASKS.values():
        for subtask in set(kind) - {"artwork", "code_reasoning"}:
            write_image(release / subtask / "1.png", GREEN)
            (release / subtask / "1.txt").write_text("Is it green?\tYes\nIs it red?\tNo\n")
    write_image(release / "artwork" / "images" / "10002.jpg", RED)
    (release / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (release / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
        "Is this by Monet? Please answer yes or no.\tYes\nIs this by Dali? Please answer yes or no.\tNo\n")
    write_image(release / "code_reasoning" / "0020.png", BLUE)
    (release / "code_reasoning" / "0020.txt").write_text(
        "Is the output 3? Please answer yes or no.\tNo\nIs the output 4? Please answer yes or no.\tYes\n")
    return release


def test_mme_release_folder(tmp_path):
    mme_release(tmp_path)
    samples = load_benchmark("mme", tmp_path)
    check_samples(samples, "mme")
    assert len(samples) == 2 * 14
    samples = [s for s in samples if s.reference["category"] in ("artwork", "code_reasoning")]
    assert [s.id for s in samples] == ["artwork/10002.jpg#1", "artwork/10002.jpg#2",
                                       "code_reasoning/0020.png#1", "code_reasoning/0020.png#2"]
    assert samples[1].question == "Is this by Dali?" + SHORT
    assert [color_of(s.images[0]) for s in samples] == [RED, RED, BLUE, BLUE]
    # artwork: both right (200); code_reasoning: one right (acc 50, acc+ 0); llava rule
    result = score("mme", ["Yes", "no", "No", "No"], [s.reference for s in samples], scoring="llava")
    assert (result["perception"], result["cognition"]) == (200.0, 50.0)


def test_vizwiz_annotation_file(tmp_path):
    entries = [{"image": "VizWiz_val_00000000.jpg", "question": "what is this?", "answer_type": "other",
                "answerable": 1, "answers": [{"answer": "soup", "answer_confidence": "yes"}] * 10}]
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "Annotations" / "val.json").write_text(json.dumps(entries))
    write_image(tmp_path / "val" / "VizWiz_val_00000000.jpg", GREEN)
    [sample] = load_benchmark("vizwiz", tmp_path)
    assert sample.id == "VizWiz_val_00000000.jpg" and sample.reference == {"answers": ["soup"] * 10,
                                                                          "category": "other"}
    assert score("vizwiz", ["Soup"], [sample.reference])["score"] == pytest.approx(100.0)


def test_ocrbench_json_and_image_folder(tmp_path):
    entries = [{"dataset_name": "IIIT5K", "id": 0, "image_path": "IIIT5K/imgs/1.jpg", "question":
                "what is written in the image?", "answers": ["CENTRE"], "type": "Regular Text Recognition"}]
    (tmp_path / "OCRBench").mkdir()
    (tmp_path / "OCRBench" / "OCRBench.json").write_text(json.dumps(entries))
    write_image(tmp_path / "OCRBench_Images" / "IIIT5K" / "imgs" / "1.jpg", RED)
    [sample] = load_benchmark("ocrbench", tmp_path)
    assert sample.id == "0" and color_of(sample.images[0]) == RED
    assert sample.reference == {"answer": ["CENTRE"], "dataset": "IIIT5K", "question_type": "Regular Text Recognition"}
    assert score("ocrbench", ["CENTRE"], [sample.reference])["score"] == 1.0
    entries[0]["Question"] = entries[0].pop("question")  # a misnamed field is listed among those the entry has
    (tmp_path / "OCRBench" / "OCRBench.json").write_text(json.dumps(entries))
    raises(re.escape("entry 0: field 'question' is missing; expected a non-empty string (fields present: "
                     "dataset_name, id, image_path, answers, type, Question)"), load_benchmark, "ocrbench", tmp_path)


def test_files_pointed_at_directly_find_their_images_where_the_release_puts_them(tmp_path):
    """The image folders each reader looks in besides the file's own: GQA's images/ beside data/, OCRBench_Images/
    beside the OCRBench/ folder, ScienceQA's problems under scienceqa/ (its repository's data/scienceqa)."""
    (tmp_path / "gqa" / "data").mkdir(parents=True)
    (tmp_path / "gqa" / "data" / "testdev_balanced_questions.json").write_text(json.dumps(
        {"201": {"imageId": "n1", "question": "Is it red?", "answer": "yes"}}))
    write_image(tmp_path / "gqa" / "images" / "n1.jpg", GREEN)
    assert color_of(load_benchmark("gqa", tmp_path / "gqa")[0].images[0]) == GREEN
    (tmp_path / "ocr" / "OCRBench").mkdir(parents=True)
    (tmp_path / "ocr" / "OCRBench" / "OCRBench.json").write_text(json.dumps([
        {"dataset_name": "IIIT5K", "id": 0, "image_path": "1.jpg", "question": "what is written?",
         "answers": ["CENTRE"], "type": "Regular Text Recognition"}]))
    write_image(tmp_path / "ocr" / "OCRBench_Images" / "1.jpg", BLUE)
    assert color_of(load_benchmark("ocrbench", tmp_path / "ocr" / "OCRBench" / "OCRBench.json")[0].images[0]) == BLUE
    (tmp_path / "sqa" / "scienceqa").mkdir(parents=True)
    sqa_llava(tmp_path / "sqa" / "scienceqa")
    assert [s.id for s in load_benchmark("scienceqa_img", tmp_path / "sqa")] == ["1"]


def test_pope_files_holding_a_json_array_after_blank_space(tmp_path):
    pope_llava(tmp_path)
    for file in (tmp_path / "coco").iterdir():
        rows = [json.loads(line) for line in file.read_text().splitlines()]
        file.write_text("\n  " + json.dumps(rows, indent=1))
    assert [s.id for s in load_benchmark("pope", tmp_path)] == [
        "adversarial/1", "popular/1", "popular/2", "random/1", "random/2"]


def test_llava_files_missing_their_main_part_are_refused(tmp_path):
    (tmp_path / "gqa").mkdir()
    (tmp_path / "gqa" / "testdev_balanced_questions.json").write_text(" \n")
    raises(re.escape("testdev_balanced_questions.json: is empty; re-download"), load_benchmark, "gqa",
           tmp_path / "gqa")
    (tmp_path / "textvqa").mkdir()
    (tmp_path / "textvqa" / "TextVQA_0.5.1_val.json").write_text(json.dumps({"dataset_name": "textvqa"}))
    raises(re.escape("TextVQA_0.5.1_val.json: has no 'data' list"), load_benchmark, "textvqa", tmp_path / "textvqa")
    for splits in ({"train": ["3"]}, {"test": []}, {"test": "1"}):
        (tmp_path / "sqa").mkdir(exist_ok=True)
        sqa_llava(tmp_path / "sqa")
        (tmp_path / "sqa" / "pid_splits.json").write_text(json.dumps(splits))
        raises(re.escape("pid_splits.json: has no 'test' list of problem ids"), load_benchmark, "scienceqa_img",
               tmp_path / "sqa")


def test_mme_question_files_as_the_release_spells_them(tmp_path):
    """Files read in name order (a --limit keeps the same questions on every machine), blank lines skipped, an answer's
    trailing space dropped, an image named .JPG found."""
    release = mme_release(tmp_path)
    folder = release / "code_reasoning"
    for name in ("0030", "0010"):  # written out of order
        write_image(folder / f"{name}.JPG", RED)
        (folder / f"{name}.txt").write_text("Is the output 1?\tYes \n\nIs the output 2?\tNo\n\n")
    samples = [s for s in load_benchmark("mme", tmp_path) if s.reference["category"] == "code_reasoning"]
    assert [s.id for s in samples] == ["code_reasoning/0010.JPG#1", "code_reasoning/0010.JPG#2",
                                       "code_reasoning/0020.png#1", "code_reasoning/0020.png#2",
                                       "code_reasoning/0030.JPG#1", "code_reasoning/0030.JPG#2"]
    assert [s.reference["answer"] for s in samples] == ["Yes", "No", "No", "Yes", "Yes", "No"]


def test_mmbench_tsv_in_a_subfolder_dev_before_test_and_an_image_over_csvs_cell_limit(tmp_path):
    """A folder holding MMBench's TSVs one level down; its dev file read whichever name sorts first (VLMEvalKit's
    MMBench_TEST_EN before MMBench's own mmbench_dev); a real photo's base64 cell, over csv's default 128 KiB."""
    noise = Image.frombytes("RGB", (256, 256), np.random.default_rng(0).bytes(256 * 256 * 3))
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG")
    large = base64.b64encode(buffer.getvalue()).decode()
    assert len(large) > 131072
    rows = [[*MMBENCH_TSV_ROWS[0][:9], large, *MMBENCH_TSV_ROWS[0][10:]], MMBENCH_TSV_ROWS[2]]
    (tmp_path / "MMBench").mkdir()
    write_tsv(tmp_path / "MMBench" / "mmbench_dev_20230712.tsv", rows)
    write_tsv(tmp_path / "MMBench" / "MMBench_TEST_EN.tsv", [[*row[:7], "", *row[8:]] for row in rows])
    limit = csv.field_size_limit()
    samples = load_benchmark("mmbench_en", tmp_path)
    assert csv.field_size_limit() == limit  # (the process's: raised only while the file is read)
    assert [s.reference["answer"] for s in samples] == ["A", "B"]
    assert samples[0].images[0].tobytes() == samples[1].images[0].tobytes() == noise.tobytes()


def test_a_file_that_is_no_mmbench_tsv_is_not_read_as_one(tmp_path):
    """MMBench's reader takes a .tsv file; another file named directly gets the list of formats, not a TSV's errors."""
    file = tmp_path / "mmbench_dev_20230712.json"
    file.write_text("[]")
    raises(re.escape("no mmbench_en data in a format this loader reads. Accepted: (a)"), load_benchmark, "mmbench_en",
           file)


# --- task table ------------------------------------------------------------------------------------------

def test_task_table_has_lmms_eval_generation_lengths():
    assert set(TASKS) == {"gqa", "mmbench_en", "mmbench_cn", "mme", "pope", "scienceqa_img", "textvqa", "vizwiz",
                          "ocrbench", "videomme"}
    assert {t: s.max_new_tokens for t, s in TASKS.items()} == {
        "gqa": 16, "mmbench_en": 1024, "mmbench_cn": 256, "mme": 16, "pope": 128, "scienceqa_img": 16,
        "textvqa": 1024, "vizwiz": 1024, "ocrbench": 128, "videomme": 16}
    assert all(s.description and "\n" not in s.description for s in TASKS.values())


def test_task_aliases_are_accepted(tmp_path):
    write_parquet(tmp_path / "x.parquet", sqa_rows())
    assert load_benchmark("scienceqa", tmp_path)[0].task == "scienceqa_img"


# --- errors ----------------------------------------------------------------------------------------------

def raises(match, fn, *args, **kwargs):
    with pytest.raises(ValueError, match=match) as info:
        fn(*args, **kwargs)
    return str(info.value)


def test_unknown_task_lists_known_ones(tmp_path):
    msg = raises("unknown task 'popee'", load_benchmark, "popee", tmp_path)
    assert all(t in msg for t in TASKS)


def test_missing_path_and_bad_limit(tmp_path):
    raises("does not exist", load_benchmark, "pope", tmp_path / "nope")
    raises("limit must be a positive integer", load_benchmark, "pope", tmp_path, limit=0)


def test_unrecognised_folder_lists_accepted_formats(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    msg = raises("no pope data in a format", load_benchmark, "pope", tmp_path)
    assert "parquet" in msg and "save_to_disk" in msg and "coco_pope_" in msg and "lmms-lab/POPE" in msg


def test_parquet_row_missing_field_names_file_row_field(tmp_path):
    rows = pope_rows()
    rows[2]["answer"] = None
    write_parquet(tmp_path / "pope.parquet", rows)
    raises(re.escape("pope.parquet row 2: field 'answer' is null; expected 'yes' or 'no'"),
           load_benchmark, "pope", tmp_path)


def test_parquet_bad_answer_value(tmp_path):
    rows = pope_rows()
    rows[1]["answer"] = "maybe"
    write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", rows)
    raises(re.escape("data/test-00000-of-00001.parquet row 1: field 'answer' is 'maybe'; expected 'yes' or 'no'"),
           load_benchmark, "pope", tmp_path)


def test_unreadable_image_bytes(tmp_path):
    rows = pope_rows()
    rows[3]["image"] = {"bytes": b"not an image", "path": None}
    write_parquet(tmp_path / "pope.parquet", rows)
    raises(re.escape("pope.parquet row 3: field 'image' is not a readable image"), load_benchmark, "pope", tmp_path)


def test_an_image_struct_holding_a_path_is_read_from_it_and_one_holding_nothing_is_refused(tmp_path):
    (tmp_path / "blue.png").write_bytes(png(BLUE))
    rows = pope_rows()
    rows[1]["image"] = {"bytes": None, "path": str(tmp_path / "blue.png")}  # a dataset that stores its images' paths
    write_parquet(tmp_path / "pope.parquet", rows)
    assert color_of(load_benchmark("pope", tmp_path)[1].images[0]) == BLUE
    rows[1]["image"] = {"bytes": None, "path": None}
    write_parquet(tmp_path / "pope.parquet", rows)
    raises(re.escape("pope.parquet row 1: field 'image' is missing or empty"), load_benchmark, "pope", tmp_path)


def cut_in_half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def noisy(fmt: str, mode: str) -> bytes:
    """An image whose pixels fill many bytes, so that half of its file is a header and part of its pixels."""
    buf = io.BytesIO()
    Image.effect_noise((64, 48), 64).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt, mode", [("PNG", "RGB"), ("JPEG", "RGB"), ("PNG", "L")])
def test_truncated_image_bytes_stop_the_load_naming_the_row(tmp_path, fmt, mode):
    # Image.open reads only the header: a file cut short passed the loader and stopped the run later in the
    # processor with a bare "image file is truncated", naming neither file nor row (a grey one, converted to RGB
    # at load, stopped the load with that bare OSError)
    rows = pope_rows()
    rows[2]["image"] = {"bytes": cut_in_half(noisy(fmt, mode)), "path": None}
    write_parquet(tmp_path / "pope.parquet", rows)
    msg = raises(re.escape("pope.parquet row 2: field 'image' is not a readable image (image file is truncated"),
                 load_benchmark, "pope", tmp_path)
    assert msg.endswith("; replace the image with a valid JPEG/PNG")


def ocrbench_with_image_path(root, image_path):
    entries = [{"dataset_name": "IIIT5K", "id": 0, "image_path": image_path, "question": "what is written?",
                "answers": ["CENTRE"], "type": "Regular Text Recognition"}]
    (root / "OCRBench").mkdir()
    (root / "OCRBench" / "OCRBench.json").write_text(json.dumps(entries))
    (root / "OCRBench_Images").mkdir()


def test_truncated_image_file_is_named_by_its_path(tmp_path):
    ocrbench_with_image_path(tmp_path, "IIIT5K/1.jpg")
    image = tmp_path / "OCRBench_Images" / "IIIT5K" / "1.jpg"
    image.parent.mkdir()
    image.write_bytes(cut_in_half(noisy("JPEG", "RGB")))
    msg = raises(re.escape(f"OCRBench/OCRBench.json entry 0: field 'image_path' names {image.resolve()}, which is "
                           "not a readable image (image file is truncated"), load_benchmark, "ocrbench", tmp_path)
    assert "replace the image with a valid JPEG/PNG" in msg


@pytest.mark.parametrize("image_path", ["../OCRBench/OCRBench.json", "ABSOLUTE"])
def test_image_path_leading_elsewhere_names_the_file_read(tmp_path, image_path):
    # a path like ../x or /x reads a file outside the image folder: the error names the file actually read
    outside = tmp_path / "notes.txt"
    outside.write_text("not an image")
    ocrbench_with_image_path(tmp_path, str(outside) if image_path == "ABSOLUTE" else image_path)
    read = outside if image_path == "ABSOLUTE" else tmp_path / "OCRBench" / "OCRBench.json"
    raises(re.escape(f"field 'image_path' names {read.resolve()}, which is not a readable image (not an image "
                     "file); replace the image with a valid JPEG/PNG, or correct the path"),
           load_benchmark, "ocrbench", tmp_path)


def test_missing_image_column(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "image"} for r in pope_rows()]
    write_parquet(tmp_path / "pope.parquet", rows)
    raises(re.escape("pope.parquet row 0: field 'image' is missing"), load_benchmark, "pope", tmp_path)


def test_several_splits_none_evaluated(tmp_path):
    write_parquet(tmp_path / "train-00000-of-00001.parquet", pope_rows())
    write_parquet(tmp_path / "val-00000-of-00001.parquet", pope_rows())
    raises("holds splits train, val but not 'test'", load_benchmark, "pope", tmp_path)


def test_mmbench_cn_folder_is_not_read_as_en(tmp_path):
    write_parquet(tmp_path / "cn" / "dev-00000-of-00001.parquet", [mmbench_row(0, "Q?", {"A": "x", "B": "y"}, "A")])
    raises("holds lmms-lab/MMBench's cn config but not 'en'", load_benchmark, "mmbench_en", tmp_path)


def test_corrupt_parquet_file(tmp_path):
    (tmp_path / "pope.parquet").write_bytes(b"PAR1 garbage")
    raises("pope.parquet: not a readable parquet file", load_benchmark, "pope", tmp_path)


def test_save_to_disk_state_lists_missing_shard(tmp_path):
    save_to_disk(tmp_path, pope_rows(), split="test")
    state = json.loads((tmp_path / "state.json").read_text())
    state["_data_files"].append({"filename": "data-00001-of-00002.arrow"})  # a shard lost in the copy
    (tmp_path / "state.json").write_text(json.dumps(state))
    raises("state.json: lists data file data-00001-of-00002.arrow, which does not exist", load_benchmark, "pope",
           tmp_path)


def test_gqa_without_image_config(tmp_path):
    gqa_snapshot(tmp_path, image_rows=[])
    raises("GQA's questions and images are separate configs", load_benchmark, "gqa", tmp_path)


def test_gqa_question_whose_image_is_absent(tmp_path):
    gqa_snapshot(tmp_path, image_rows=[{"id": "img1", "image": hf_image(RED)}])
    raises(re.escape("testdev_balanced_instructions/testdev-00000-of-00001.parquet row 1: field 'imageId' is 'img2'"),
           load_benchmark, "gqa", tmp_path)


def test_mmbench_lists_the_option_cells_lmms_eval_lists(tmp_path):
    """lmms-eval's create_options_prompt lists a cell that is truthy, not NaN and not the string "nan": a cell of
    spaces or "NaN" is listed, an empty one, "nan" or NaN is not; the scored options are the listed ones."""
    from vtprune.eval.fields import listed_option

    assert [listed_option(v) for v in ("x", " ", "NaN", "nan", "", None, float("nan"))] == [
        True, True, True, False, False, False, False]
    rows = mmbench_question(0, "Q?", ["x", " "], "x")
    for row in rows:
        row["C"] = "nan"
    write_parquet(tmp_path / "dev.parquet", rows)
    first = load_benchmark("mmbench_en", tmp_path)[0]
    assert "A. x\nB.  \n" in first.question and "C. " not in first.question
    assert {k: first.reference[k] for k in "ABC"} == {"A": "x", "B": " ", "C": None}


def test_mmbench_answer_not_an_option(tmp_path):
    write_parquet(tmp_path / "dev.parquet", [mmbench_row(0, "Q?", {"A": "x", "B": "y"}, "C")])
    raises(re.escape("dev.parquet row 0: field 'answer' is 'C'; expected one of its option letters A, B"),
           load_benchmark, "mmbench_en", tmp_path)


def test_mmbench_test_split_without_answers(tmp_path):
    write_parquet(tmp_path / "dev.parquet", [mmbench_row(0, "Q?", {"A": "x", "B": "y"}, None)])
    raises(re.escape("dev.parquet row 0: field 'answer' is null; expected the gold option letter"),
           load_benchmark, "mmbench_en", tmp_path)


@pytest.mark.parametrize("answer", [5, 3])  # (3: one past the last of its 3 choices)
def test_scienceqa_answer_out_of_range(tmp_path, answer):
    rows = sqa_rows()
    rows[1]["answer"] = answer
    write_parquet(tmp_path / "sqa.parquet", rows)
    raises(re.escape(f"sqa.parquet row 1: field 'answer' is {answer}; expected an index into its 3 choices"),
           load_benchmark, "scienceqa_img", tmp_path)


def test_an_mmbench_hint_spelled_nan_is_skipped_in_english_and_kept_in_chinese(tmp_path):
    """lmms-eval's en_utils skips a hint that is NaN or the string "nan"; its cn_utils only NaN (pd.notna)."""
    for config in ("en", "cn"):
        write_parquet(tmp_path / config / "dev-00000-of-00001.parquet",
                      mmbench_question(0, "Which?", ["x", "y"], "x", hint="nan"))
    assert load_benchmark("mmbench_en", tmp_path)[0].question.startswith("Which? There are several options")
    assert load_benchmark("mmbench_cn", tmp_path)[0].question.startswith("nan Which? There are several options")


def test_textvqa_answers_must_be_a_list(tmp_path):
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": [
        {"question_id": 1, "image_id": "a", "question": "what?", "answers": "one string"}]}))
    raises(re.escape("TextVQA_0.5.1_val.json data[0]: field 'answers' is 'one string'; expected the list of human"),
           load_benchmark, "textvqa", tmp_path)


def test_ocrbench_unknown_question_type(tmp_path):
    entries = [{"dataset_name": "IIIT5K", "id": 0, "image_path": "a.jpg", "question": "q", "answers": ["x"],
                "type": "Poetry"}]
    (tmp_path / "OCRBench.json").write_text(json.dumps(entries))
    raises(re.escape("OCRBench.json entry 0: field 'type' is 'Poetry'; expected one of: Regular Text Recognition"),
           load_benchmark, "ocrbench", tmp_path)


def test_llava_field_errors_name_the_file_field(tmp_path):
    pope_llava(tmp_path)
    path = tmp_path / "coco" / "coco_pope_random.json"
    lines = path.read_text().splitlines()
    lines[1] = json.dumps({k: v for k, v in json.loads(lines[1]).items() if k != "label"})
    path.write_text("\n".join(lines) + "\n")
    # the file calls the gold answer "label": the message says so
    raises(re.escape("coco/coco_pope_random.json line 2: field 'label' is missing; expected 'yes' or 'no'"),
           load_benchmark, "pope", tmp_path)


def test_llava_invalid_json_line(tmp_path):
    pope_llava(tmp_path)
    with open(tmp_path / "coco" / "coco_pope_popular.json", "a") as f:
        f.write("{not json\n")
    raises(re.escape("coco/coco_pope_popular.json line 3: not valid JSON"), load_benchmark, "pope", tmp_path)


def test_a_bad_json_line_after_a_blank_line_is_named_by_its_file_line(tmp_path):
    pope_llava(tmp_path)
    with open(tmp_path / "coco" / "coco_pope_popular.json", "a") as f:
        f.write("\n{not json\n")  # lines 1-2 questions, line 3 blank, line 4 the bad one
    raises(re.escape("coco/coco_pope_popular.json line 4: not valid JSON"), load_benchmark, "pope", tmp_path)


def test_a_scienceqa_test_id_missing_from_problems_is_refused(tmp_path):
    sqa_llava(tmp_path)
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["1", "99"], "train": ["3"]}))
    raises("test id '99' is not in problems.json", load_benchmark, "scienceqa_img", tmp_path)


def test_scienceqa_files_with_no_test_question_with_an_image_are_refused(tmp_path):
    sqa_llava(tmp_path)
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["2"], "train": ["1", "3"]}))  # "2" has no image
    raises(re.escape("problems.json: none of the 1 test problems pid_splits.json lists has an image, and "
                     "ScienceQA-IMG is those that do"), load_benchmark, "scienceqa_img", tmp_path)


def test_scienceqa_test_ids_written_as_numbers_name_their_problems(tmp_path):
    sqa_llava(tmp_path)
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": [1, 2], "train": [3]}))
    assert [s.id for s in load_benchmark("scienceqa_img", tmp_path)] == ["1"]


def test_llava_missing_image_file(tmp_path):
    pope_llava(tmp_path)
    (tmp_path / "val2014" / "COCO_val2014_random.jpg").unlink()
    msg = raises(re.escape("coco/coco_pope_random.json line 1: field 'image' names image"), load_benchmark,
                 "pope", tmp_path)
    assert "which does not exist; put the images in" in msg and "val2014" in msg
    (tmp_path / "val2014" / "COCO_val2014_random.jpg").mkdir()  # a folder where the image should be
    raises(re.escape("field 'image' names image ") + ".*COCO_val2014_random.jpg, a folder, not an image file; put the "
           "images in", load_benchmark, "pope", tmp_path)


def test_gqa_json_not_valid(tmp_path):
    (tmp_path / "testdev_balanced_questions.json").write_text('{"1": {\n"imageId": }')
    raises(re.escape("testdev_balanced_questions.json line 2: not valid JSON"), load_benchmark, "gqa", tmp_path)


def test_scienceqa_without_pid_splits(tmp_path):
    sqa_llava(tmp_path)
    (tmp_path / "pid_splits.json").unlink()
    raises("pid_splits.json is missing next to it", load_benchmark, "scienceqa_img", tmp_path)


@pytest.mark.parametrize("text, line", [
    ("Is the output 3?\tNo\nIs the output 4?\n", 2),  # no answer
    ("Is the output 3?\tNo\tmaybe\nIs the output 4?\tYes\n", 1),  # a third field
])
def test_an_mme_line_that_is_not_a_question_and_its_answer_is_refused(tmp_path, text, line):
    release = mme_release(tmp_path)
    (release / "code_reasoning" / "0020.txt").write_text(text)
    raises(re.escape(f"MME_Benchmark_release_version/code_reasoning/0020.txt line {line}: field 'answer' is not the"),
           load_benchmark, "mme", tmp_path)


def test_mme_question_file_without_image(tmp_path):
    release = mme_release(tmp_path)
    (release / "code_reasoning" / "0020.png").unlink()
    raises(re.escape("code_reasoning/0020.txt (every line): field 'image' has no file 0020.jpg/.png"),
           load_benchmark, "mme", tmp_path)


def test_mmbench_tsv_errors(tmp_path):
    tsv = tmp_path / "mmbench_dev_20230712.tsv"
    write_tsv(tsv, [["5", "Q?", "", "x", "y", "", "", "A", "c", "3", "s", "l", "", "dev"]])
    raises(re.escape("mmbench_dev_20230712.tsv row 0 (line 2): field 'image' refers to row index 3"),
           load_benchmark, "mmbench_en", tsv)
    tsv.write_text("index\tquestion\tanswer\n0\tQ?\tA\n")
    raises(re.escape("mmbench_dev_20230712.tsv line 1: no 'image' column"), load_benchmark, "mmbench_en", tsv)


def test_a_split_missing_a_shard_is_refused(tmp_path):
    write_parquet(tmp_path / "data" / "test-00000-of-00003.parquet", pope_rows()[:2])
    write_parquet(tmp_path / "data" / "test-00002-of-00003.parquet", pope_rows()[2:])
    raises(re.escape("split 'test' has 2 of its 3 shards (test-00001-of-00003 missing)"),
           load_benchmark, "pope", tmp_path)


def test_hidden_folders_are_not_read_and_shards_are_read_in_order(tmp_path, monkeypatch):
    import os

    from vtprune.eval import tables

    write_parquet(tmp_path / "data" / "test-00000-of-00002.parquet", pope_rows()[:2])
    write_parquet(tmp_path / "data" / "test-00001-of-00002.parquet", pope_rows()[2:])
    # a download cache beside the snapshot (.cache/huggingface) holds copies that are not more of the benchmark
    write_parquet(tmp_path / ".cache" / "huggingface" / "test-00000-of-00002.parquet", pope_rows()[:2])
    walk = os.walk  # a file system that lists a folder's files in another order: the rows keep the shards' order
    monkeypatch.setattr(tables.os, "walk", lambda root: ((here, folders, files[::-1]) for here, folders, files in
                                                         walk(root)))
    assert [s.id for s in load_benchmark("pope", tmp_path)] == ["adversarial/1", "adversarial/2", "random/1",
                                                                "random/2"]
    raises(re.escape("split 'test' has 1 of its 2 shards (test-00001-of-00002 missing)"),  # one shard given alone
           load_benchmark, "pope", tmp_path / "data" / "test-00000-of-00002.parquet")


def test_split_files_without_shard_numbers_and_another_tools_state_json(tmp_path):
    write_parquet(tmp_path / "train.parquet", pope_rows()[:1])
    write_parquet(tmp_path / "test.parquet", pope_rows())
    (tmp_path / "state.json").write_text('["not", "a datasets state"]')  # no save_to_disk folder: no .arrow beside it
    assert len(load_benchmark("pope", tmp_path)) == 4


def test_a_save_to_disk_state_without_its_file_list_reads_its_data_files(tmp_path):
    save_to_disk(tmp_path, pope_rows(), split="test")
    state = json.loads((tmp_path / "state.json").read_text())
    (tmp_path / "state.json").write_text(json.dumps(dict(state, _data_files=[])))
    assert len(load_benchmark("pope", tmp_path)) == 4


def test_a_shard_copied_twice_is_refused(tmp_path):
    write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", pope_rows())
    write_parquet(tmp_path / "data" / "backup" / "test-00000-of-00001.parquet", pope_rows())
    raises(re.escape("shard 0 of 1 of split 'test' is there more than once (data/test-00000-of-00001.parquet, "
                     "data/backup/test-00000-of-00001.parquet)"), load_benchmark, "pope", tmp_path)


def test_a_repeated_row_is_refused_and_a_repeated_id_is_renamed(tmp_path):
    rows = pope_rows()
    write_parquet(tmp_path / "pope.parquet", rows + rows[1:2])
    raises(re.escape("pope.parquet row 4: repeats pope.parquet row 1 (same id 'adversarial/2', question and "
                     "answer)"), load_benchmark, "pope", tmp_path)
    write_parquet(tmp_path / "pope.parquet", rows + [{**rows[1], "question": "Is there a cow in the image?"}])
    samples = load_benchmark("pope", tmp_path)
    assert [s.id for s in samples][-1] == "adversarial/2#2" and samples[1].id == "adversarial/2#1"
    assert samples[4].source == "pope.parquet row 4"


def test_pope_answer_with_a_period_is_refused_as_its_scorers_refuse_it(tmp_path):
    rows = pope_rows()
    rows[0]["answer"] = "Yes."
    write_parquet(tmp_path / "pope.parquet", rows)
    raises(re.escape("pope.parquet row 0: field 'answer' is 'Yes.'; expected 'yes' or 'no'"),
           load_benchmark, "pope", tmp_path)


def test_ocrbench_blank_answer_is_refused(tmp_path):
    row = {"question": "What is written?", "answer": ["12", "  "], "dataset": "IIIT5K",
           "question_type": "Regular Text Recognition", "image": hf_image()}
    write_parquet(tmp_path / "ocr.parquet", [row])
    raises(re.escape("ocr.parquet row 0: field 'answer' holds a blank answer"), load_benchmark, "ocrbench",
           tmp_path)


# --- Video-MME ---------------------------------------------------------------------------------------------

def write_video(path, frames=10, size=(32, 24)):
    """An mp4 whose frame i is uniformly grey 20 * i."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((size[1], size[0], 3), 20 * i, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def videomme_rows():
    return [{"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Astronomy",
             "url": "", "videoID": vid, "question_id": qid, "task_type": "Counting Problem",
             "question": "How many planets are shown?", "options": ["A. 1", "B. 2", "C. 3", "D. 4"], "answer": answer}
            for vid, qid, answer in [("fFjv93ACGo8", "001-1", "C"), ("fFjv93ACGo8", "001-2", "A"),
                                     ("xyz", "002-1", "B")]]


def test_videomme_parquet_with_its_videos(tmp_path):
    write_parquet(tmp_path / "videomme" / "test-00000-of-00001.parquet", videomme_rows())
    write_video(tmp_path / "data" / "fFjv93ACGo8.mp4")
    write_video(tmp_path / "data" / "xyz.mkv")
    samples = load_benchmark("videomme", tmp_path)
    assert [s.id for s in samples] == ["001-1", "001-2", "002-1"] and not samples[0].images
    assert samples[0].videos == (tmp_path / "data" / "fFjv93ACGo8.mp4",)
    assert samples[2].videos == (tmp_path / "data" / "xyz.mkv",)
    # lmms-eval's videomme_doc_to_text with the default post prompt (its own leading newline: two in a row)
    assert samples[0].question == (
        "Select the best answer to the following multiple-choice question based on the video and the subtitles. "
        "Respond with only the letter (A, B, C, or D) of the correct option.\nHow many planets are shown?\n"
        "A. 1\nB. 2\nC. 3\nD. 4\n\nAnswer with the option's letter from the given choices directly.")
    assert samples[0].reference == {"answer": "C", "duration": "short", "domain": "Knowledge",
                                    "task_type": "Counting Problem", "videoID": "fFjv93ACGo8"}
    assert score("videomme", ["C", "B", "B"], [s.reference for s in samples])["score"] == pytest.approx(200 / 3)
    # the parquet file named directly: the hub snapshot's data/, beside its videomme/ folder
    direct = load_benchmark("videomme", tmp_path / "videomme" / "test-00000-of-00001.parquet")
    assert [s.videos for s in direct] == [s.videos for s in samples]
    # the snapshot's videomme/ folder (what `--data SNAPSHOT --tasks videomme` reads): its data/ beside it
    assert [s.videos for s in load_benchmark("videomme", tmp_path / "videomme")] == [s.videos for s in samples]


def test_a_videomme_answer_letter_with_spaces_is_read_and_an_unknown_duration_refused(tmp_path):
    rows = videomme_rows()
    rows[0]["answer"] = " C "
    write_parquet(tmp_path / "videomme" / "test-00000-of-00001.parquet", rows)
    write_video(tmp_path / "data" / "fFjv93ACGo8.mp4")
    write_video(tmp_path / "data" / "xyz.mkv")
    assert load_benchmark("videomme", tmp_path)[0].reference["answer"] == "C"
    rows[1]["duration"] = "tiny"  # its score is kept per duration: one outside them would drop out of each
    write_parquet(tmp_path / "videomme" / "test-00000-of-00001.parquet", rows)
    raises(re.escape("test-00000-of-00001.parquet row 1: field 'duration' is 'tiny'; expected one of short, medium, "
                     "long"), load_benchmark, "videomme", tmp_path)


def test_videomme_without_its_video_names_the_row(tmp_path):
    write_parquet(tmp_path / "videomme" / "test-00000-of-00001.parquet", videomme_rows())
    write_video(tmp_path / "data" / "fFjv93ACGo8.mp4")
    raises(re.escape("videomme/test-00000-of-00001.parquet row 2: field 'videoID' is 'xyz', but "),
           load_benchmark, "videomme", tmp_path)


@pytest.mark.parametrize("suffix", ["mp4", "mkv"])  # an mkv's stream does not say its frame count: they are counted
def test_frames_are_sampled_uniformly_from_first_to_last(tmp_path, suffix):
    from vtprune.eval.videos import read_frames

    video = write_video(tmp_path / f"v.{suffix}", frames=10)
    frames = read_frames(video, 4)  # lmms-eval's np.linspace(0, 9, 4, dtype=int): frames 0, 3, 6, 9
    assert frames.shape == (4, 24, 32, 3) and frames.dtype.name == "uint8"
    assert [round(float(f.mean()) / 20) for f in frames] == [0, 3, 6, 9]
    frames[:] = 0  # a caller's changes stay its own: the next question about the video reads it as it is
    assert [round(float(f.mean()) / 20) for f in read_frames(video, 4)] == [0, 3, 6, 9]
    assert read_frames(video, 16).shape[0] == 10  # never more than the video has
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    raises("bad.mp4: not a readable video", read_frames, tmp_path / "bad.mp4", 4)


# --- MMBench rotation sets, the benchmark a copy is, entries, encodings, empty files, contradictions ----------

def test_mmbench_limit_keeps_every_rotation_of_the_questions_it_keeps(tmp_path):
    write_tsv(tmp_path / "mmbench_dev_20230712.tsv", MMBENCH_TSV_ROWS)
    samples = load_benchmark("mmbench_en", tmp_path, limit=1)
    assert [s.id for s in samples] == ["0", "1000000"]  # the rotation is far down the file, after the originals
    # a model that always answers "A" gets every question's rotation wrong: 0, as on the whole file
    assert score("mmbench_en", ["A", "A"], [s.reference for s in samples])["score"] == 0.0
    assert [s.id for s in load_benchmark("mmbench_en", tmp_path, limit=2)] == ["0", "2", "1000000", "1000002",
                                                                               "2000002"]


def test_mmbench_question_missing_a_rotation_is_refused(tmp_path):
    write_tsv(tmp_path / "mmbench_dev_20230712.tsv", MMBENCH_TSV_ROWS[:-1])  # question 2 lacks rotation 2
    raises(re.escape("mmbench_dev_20230712.tsv row 1 (line 3); mmbench_dev_20230712.tsv row 3 (line 5): MMBench "
                     "question 2 has 3 options, so circular evaluation needs its 3 rotations (index 2 + k x "
                     "1,000,000, k = 0..2), but has index 2000002 missing"), load_benchmark, "mmbench_en", tmp_path)
    # a copy of the originals alone (a parquet here) is refused the same way: it would be scored as plain accuracy
    write_parquet(tmp_path / "en" / "dev.parquet", [mmbench_question(0, "Q?", ["x", "y"], "x")[0]])
    raises(re.escape("dev.parquet row 0: MMBench question 0 has 2 options"), load_benchmark, "mmbench_en",
           tmp_path / "en")


def test_mmbench_index_shared_by_two_questions_is_refused(tmp_path):
    tsv = tmp_path / "mmbench_dev_20230712.tsv"
    write_tsv(tsv, [["5", "What is shown?", "", "cat", "dog", "", "", "A", "c1", b64(RED), "s", "l2", "", "dev"],
                    ["5", "Which colour?", "", "red", "blue", "", "", "B", "c1", b64(BLUE), "s", "l2", "", "dev"]])
    raises(re.escape("mmbench_dev_20230712.tsv row 1 (line 3): has index 5, as mmbench_dev_20230712.tsv row 0 "
                     "(line 2) has"), load_benchmark, "mmbench_en", tsv)
    rows = [list(r) for r in MMBENCH_TSV_ROWS]
    rows[2][1] = "Which colour?"  # index 1000000 would make another question a rotation of question 0
    write_tsv(tsv, rows)
    raises(re.escape("mmbench_dev_20230712.tsv row 2 (line 4): its index 1000000 makes it a rotation of question 0 "
                     "(mmbench_dev_20230712.tsv row 0 (line 2)), but its question or options differ"),
           load_benchmark, "mmbench_en", tsv)
    rows = [list(r) for r in MMBENCH_TSV_ROWS]
    rows[2][4] = "cow"  # the same question, but not the same options: not a rotation of it
    write_tsv(tsv, rows)
    raises(re.escape("mmbench_dev_20230712.tsv row 2 (line 4): its index 1000000 makes it a rotation of question 0 "
                     "(mmbench_dev_20230712.tsv row 0 (line 2)), but its question or options differ"),
           load_benchmark, "mmbench_en", tsv)
    rows = [list(r) for r in MMBENCH_TSV_ROWS] + [["2000000", "What is shown?", "", "cat", "dog", "", "", "A", "c1",
                                                   "0", "s", "l2", "", "dev"]]
    write_tsv(tsv, rows)  # a third copy of a two-option question
    raises(re.escape("MMBench question 0 has 2 options, so circular evaluation needs its 2 rotations (index 0 + k x "
                     "1,000,000, k = 0..1), but has index 2000000 beyond its 2 rotations"), load_benchmark,
           "mmbench_en", tsv)


def test_mme_rows_given_as_pope_are_refused(tmp_path):
    write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", mme_rows())  # lmms-lab/MME's layout
    raises(re.escape("data/test-00000-of-00001.parquet row 0: field 'category' is 'code_reasoning', not a POPE "
                     "split (an MME subtask: these rows are MME's); expected adversarial, popular, random"),
           load_benchmark, "pope", tmp_path)


def test_a_folder_named_after_another_task_is_never_read(tmp_path):
    from vtprune.eval.benchmark_eval import load_tasks

    write_parquet(tmp_path / "mme" / "data" / "test-00000-of-00001.parquet", mme_rows())
    # --tasks pope --data DIR without DIR/pope reads DIR itself, but not the MME copy inside it
    msg = raises("no pope data in a format this loader reads", load_tasks, ["pope"], tmp_path, None)
    assert "(mme/ under it: named after another task, which pope never reads)" in msg
    raises(re.escape("mme: is named after task mme, not pope"), load_benchmark, "pope", tmp_path / "mme")
    # MMBench's two languages are one dataset, but a folder named for one is not the other's
    write_parquet(tmp_path / "mmbench_en" / "dev-00000-of-00001.parquet",
                  mmbench_question(0, "What is shown?", ["cat", "dog"], "cat"))
    raises(re.escape("mmbench_en: is named after task mmbench_en, not mmbench_cn"), load_benchmark, "mmbench_cn",
           tmp_path / "mmbench_en")
    assert len(load_benchmark("mmbench_en", tmp_path / "mmbench_en")) == 2
    # beside POPE's own files, the other task's folder is left out
    write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", pope_rows())
    assert [s.id for s in load_benchmark("pope", tmp_path)] == ["adversarial/1", "adversarial/2", "random/1",
                                                                "random/2"]


NOT_OBJECTS = {
    "gqa": ({"testdev_balanced_questions.json": {"201": ["n1"]}},
            "testdev_balanced_questions.json question '201': holds list ['n1'], expected a JSON object"),
    "textvqa": ({"TextVQA_0.5.1_val.json": {"data": [5]}}, "TextVQA_0.5.1_val.json data[0]: holds int 5, expected"),
    "vizwiz": ({"Annotations/val.json": [5]}, "Annotations/val.json entry 0: holds int 5, expected a JSON object"),
    "ocrbench": ({"OCRBench.json": [5]}, "OCRBench.json entry 0: holds int 5, expected a JSON object"),
    "scienceqa_img": ({"problems.json": {"1": "x"}, "pid_splits.json": {"test": ["1"]}},
                      "problems.json problem '1': holds str 'x', expected a JSON object"),
    "scienceqa_img image": ({"problems.json": {"1": {"question": "Q?", "choices": ["a", "b"], "answer": 0,
                                                     "image": 5}}, "pid_splits.json": {"test": ["1"]}},
                            "problems.json problem '1': field 'image' is int 5; expected the image's file name"),
}


@pytest.mark.parametrize("case", NOT_OBJECTS)
def test_an_entry_that_is_not_an_object_is_named(tmp_path, case):
    files, message = NOT_OBJECTS[case]
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(json.dumps(content))
    raises(re.escape(message), load_benchmark, case.split()[0], tmp_path)


def test_a_file_that_is_not_utf8_is_named_with_its_line(tmp_path):
    pope_llava(tmp_path / "pope")
    (tmp_path / "pope" / "coco" / "coco_pope_random.json").write_bytes(
        b'{"question_id": 1, "image": "COCO_val2014_random.jpg", "text": "caf\xe9?", "label": "yes"}\n')
    raises(re.escape("coco/coco_pope_random.json line 1 (byte 67 of the file): not UTF-8 (byte 0xe9); the "
                     "benchmark's files are UTF-8"), load_benchmark, "pope", tmp_path / "pope")
    release = mme_release(tmp_path / "mme")
    (release / "code_reasoning" / "0020.txt").write_bytes(b"Is it 3?\tNo\nIs it caf\xe9?\tYes\n")
    raises(re.escape("code_reasoning/0020.txt line 2 (byte 21 of the file): not UTF-8"), load_benchmark, "mme",
           tmp_path / "mme")
    tsv = tmp_path / "mmbench_dev_20230712.tsv"
    write_tsv(tsv, MMBENCH_TSV_ROWS)
    tsv.write_bytes(tsv.read_bytes().replace(b"Which one?", b"Which \xe9?", 1))
    raises(re.escape("mmbench_dev_20230712.tsv line 3 (byte "), load_benchmark, "mmbench_en", tsv)


def test_an_empty_file_or_table_is_refused_at_load(tmp_path):
    pope_llava(tmp_path / "pope")
    (tmp_path / "pope" / "coco" / "coco_pope_random.json").write_text("\n  \n")
    raises(re.escape("coco/coco_pope_random.json: is empty"), load_benchmark, "pope", tmp_path / "pope")
    pq.write_table(pa.Table.from_pylist(pope_rows()).slice(0, 0), tmp_path / "pope.parquet")
    raises(re.escape("pope.parquet: no rows (an empty table)"), load_benchmark, "pope", tmp_path / "pope.parquet")
    (tmp_path / "gqa").mkdir()
    (tmp_path / "gqa" / "testdev_balanced_questions.json").write_text("{}")
    raises(re.escape("testdev_balanced_questions.json: holds no entries"), load_benchmark, "gqa", tmp_path / "gqa")
    tsv = tmp_path / "mmbench_dev_20230712.tsv"
    write_tsv(tsv, [])
    raises(re.escape("mmbench_dev_20230712.tsv: has its header but no rows"), load_benchmark, "mmbench_en", tsv)


def test_an_empty_mme_question_file_is_refused(tmp_path):
    release = mme_release(tmp_path)
    (release / "code_reasoning" / "0020.txt").write_text("")
    raises(re.escape("code_reasoning/0020.txt: is empty, so image 0020.png has no questions"), load_benchmark,
           "mme", tmp_path)


def test_rows_with_one_id_and_question_but_opposite_answers_are_refused(tmp_path):
    rows = pope_rows()
    write_parquet(tmp_path / "pope.parquet", rows + [{**rows[1], "answer": "yes"}])
    raises(re.escape("pope.parquet row 4: has the id 'adversarial/2' and question of pope.parquet row 1 but not its "
                     "answer (answer 'no' there, 'yes' here), so one of the two is wrong"), load_benchmark, "pope",
           tmp_path)
    release = mme_release(tmp_path / "mme")
    (release / "code_reasoning" / "0020.txt").write_text("Is the output 3?\tNo\nIs the output 3?\tYes\n")
    raises(re.escape("code_reasoning/0020.txt line 2: has the id 'code_reasoning/0020.png' and question of "
                     "MME_Benchmark_release_version/code_reasoning/0020.txt line 1 but not its answer"),
           load_benchmark, "mme", tmp_path / "mme")


def test_a_copy_of_another_config_or_split_is_refused(tmp_path):
    """ScienceQA-FULL for ScienceQA-IMG, another split than the one lmms-eval evaluates, a text-only ScienceQA
    row: each would be scored in the task's place."""
    write_parquet(tmp_path / "full" / "ScienceQA-FULL" / "test-00000-of-00001.parquet", sqa_rows())
    raises(re.escape("holds lmms-lab/ScienceQA's ScienceQA-FULL config but not 'ScienceQA-IMG', which scienceqa_img "
                     "reads"), load_benchmark, "scienceqa_img", tmp_path / "full")
    write_parquet(tmp_path / "val" / "validation-00000-of-00001.parquet", sqa_rows())
    raises(re.escape("holds split validation but not 'test', the split lmms-eval evaluates for scienceqa_img"),
           load_benchmark, "scienceqa_img", tmp_path / "val")
    write_parquet(tmp_path / "text" / "test-00000-of-00001.parquet", [sqa_rows()[0], {**sqa_rows()[1], "image": None}])
    raises(re.escape("test-00000-of-00001.parquet row 1: field 'image' is missing; ScienceQA-IMG's questions all "
                     "come with an image"), load_benchmark, "scienceqa_img", tmp_path / "text")
    vizwiz = [{"question_id": "VizWiz_val_00000000.jpg", "question": "what is this?", "answers": ["soup"] * 10,
               "category": "other", "image": hf_image(BLUE)}]
    write_parquet(tmp_path / "v" / "validation-00000-of-00001.parquet", vizwiz)  # VizWiz's val, spelt out
    assert len(load_benchmark("vizwiz", tmp_path / "v")) == 1
    write_parquet(tmp_path / "mine.parquet", sqa_rows())  # a name that says nothing of the split is read
    assert len(load_benchmark("scienceqa_img", tmp_path / "mine.parquet")) == 2


def test_mme_release_missing_a_subtask_is_refused(tmp_path):
    release = mme_release(tmp_path)
    for subtask in ("OCR", "count"):
        for f in (release / subtask).iterdir():
            f.unlink()
        (release / subtask).rmdir()
    raises(re.escape("MME_Benchmark_release_version: has no folder for MME subtasks count, OCR; MME's scores sum "
                     "all 14 subtasks"), load_benchmark, "mme", tmp_path)


def test_an_mme_subtask_folder_without_questions_is_refused_even_under_a_limit(tmp_path):
    """An emptied folder would drop its subtask out of the sum (a total out of 2600, not 2800) without a word."""
    release = mme_release(tmp_path)
    for f in (release / "existence").glob("*.txt"):  # its images stay: only the questions are lost
        f.unlink()
    raises(re.escape("MME_Benchmark_release_version: the folder of MME subtask existence holds no question files "
                     "(*.txt); MME's scores sum all 14 subtasks"), load_benchmark, "mme", tmp_path, limit=2)


def test_blank_cells_string_lists_and_yes_no_as_the_files_spell_them():
    """What pandas-written files and hand-made copies put in a cell, read as the metrics read it."""
    from vtprune.eval.fields import NotAStringList, _missing, _optional_id, _required, _Where, _yes_no, string_list

    blank, filled = [None, float("nan"), "", "  ", "nan", "NaN"], ["0", 0, "no", 0.0]
    assert [_missing(v) for v in blank + filled] == [True] * len(blank) + [False] * len(filled)
    assert [_optional_id({"id": v}, "id") for v in (float("nan"), "nan", 7)] == [None, None, "7"]
    with pytest.raises(NotAStringList, match="is 'yes'"):  # a string is no list of its characters
        string_list("yes")
    where = _Where("pope.jsonl", "line 3", (("question", "text"), ("answer", "label")))
    assert _yes_no({"answer": " Yes "}, "answer", where, "yes or no", period=False) == " Yes "
    with pytest.raises(ValueError, match=r"line 3: field 'label' is missing; expected yes or no \(fields present: "
                                         r"text\)"):  # the names the file has, not lmms-eval's
        _required({"question": "is it?"}, "answer", where, "yes or no")


def test_files_saved_with_a_byte_order_mark_read_as_without_one(tmp_path):
    """Editors on Windows put a UTF-8 byte-order mark first: it is no part of the text (else a TSV's first column,
    a JSON line, an MME question would carry it)."""
    def sample_fields(samples):
        return [(s.id, s.question, s.reference, [color_of(i) for i in s.images]) for s in samples]

    plain, marked = tmp_path / "plain", tmp_path / "marked"
    for root in (plain, marked):
        pope_llava(root / "pope")
        (root / "mmbench").mkdir()
        write_tsv(root / "mmbench" / "mmbench_dev_20230712.tsv", MMBENCH_TSV_ROWS)
        mme_release(root / "mme")
    for file in [*(marked / "pope" / "coco").glob("*.json"), marked / "mmbench" / "mmbench_dev_20230712.tsv",
                 marked / "mme" / "MME_Benchmark_release_version" / "code_reasoning" / "0020.txt"]:
        file.write_bytes(b"\xef\xbb\xbf" + file.read_bytes())
    for task in ("pope", "mmbench_en", "mme"):
        folder = task.split("_")[0]
        assert sample_fields(load_benchmark(task, marked / folder)) == sample_fields(load_benchmark(task, plain / folder))


# --- rows that would be scored wrongly, and files a tool wrote otherwise ---------------------------------------

def test_a_gqa_image_id_given_two_images_is_refused_and_a_repeated_copy_read(tmp_path):
    """Which of two images a question is about cannot be told; the same row twice is the same image."""
    images = [{"id": "img1", "image": hf_image(RED)}, {"id": "img2", "image": hf_image(BLUE)}]
    gqa_snapshot(tmp_path, images + [{"id": "img1", "image": hf_image(RED)}])
    assert [color_of(s.images[0]) for s in load_benchmark("gqa", tmp_path)] == [RED, BLUE, RED]
    gqa_snapshot(tmp_path, images + [{"id": "img1", "image": hf_image(GREEN)}])
    raises(re.escape("testdev_balanced_images/testdev-00000-of-00001.parquet row 2: field 'id' is 'img1', as "
                     "testdev_balanced_images/testdev-00000-of-00001.parquet row 0 has, with another image"),
           load_benchmark, "gqa", tmp_path)


@pytest.mark.parametrize("task", ["textvqa", "vizwiz"])
def test_a_vqa_question_whose_answers_are_all_blank_is_refused(tmp_path, task):
    """Every prediction would score 0 on it; one blank answer among others is a worker's and is kept."""
    row = {"question_id": 10, "question": "what is written?", "image": hf_image(RED),
           "answers": ["stop"] + [""] * 9}
    write_parquet(tmp_path / "copy.parquet", [row])
    assert load_benchmark(task, tmp_path)[0].reference["answers"] == ["stop"] + [""] * 9
    write_parquet(tmp_path / "copy.parquet", [{**row, "answers": ["", " "] * 5}])
    raises(re.escape("copy.parquet row 0: field 'answers' holds only blank answers"), load_benchmark, task, tmp_path)


def test_a_videomme_answer_beyond_its_options_is_refused(tmp_path):
    rows = videomme_rows()
    rows[2]["options"] = ["A. 1", "B. 2", "C. 3"]
    write_parquet(tmp_path / "videomme" / "test-00000-of-00001.parquet", rows)
    write_video(tmp_path / "data" / "fFjv93ACGo8.mp4")
    write_video(tmp_path / "data" / "xyz.mp4")
    assert len(load_benchmark("videomme", tmp_path)) == 3  # its answer B is one of its three
    rows[2]["answer"] = "D"
    write_parquet(tmp_path / "videomme" / "test-00000-of-00001.parquet", rows)
    raises(re.escape("row 2: field 'answer' is 'D', but the row has 3 options; expected one of its option letters "
                     "A, B, C"), load_benchmark, "videomme", tmp_path)


@pytest.mark.parametrize("column, cell, message", [
    # a tab inside an unquoted cell: each cell after it under the next column's name
    (1, "What\tis shown?", "row 0 (line 2): has 15 tab-separated fields, but the header has 14; fix the row"),
    # a quote never closed: the cell runs on over the tabs and lines after it, to the end of the file
    (1, '"What is shown?', "row 0 (line 2): has 2 tab-separated fields, but the header has 14; a quote (\") in it "
                           "is not closed, so the 4 lines after it were read as part of it"),
    (0, "two", "row 0 (line 2): field 'index' is 'two'; expected the integer question index"),
])
def test_an_mmbench_tsv_row_with_its_cells_out_of_place_is_named_for_what_is_wrong(tmp_path, column, cell, message):
    """Not as an image problem: its image cell is then another column's text, or the index a later row's image
    refers to is unusable."""
    rows = [list(r) for r in MMBENCH_TSV_ROWS]
    rows[0][column] = cell
    write_tsv(tmp_path / "mmbench_dev_20230712.tsv", rows)
    raises(re.escape("mmbench_dev_20230712.tsv " + message), load_benchmark, "mmbench_en", tmp_path)


def test_a_quoted_cell_over_several_lines_is_one_cell_and_its_row_is_named_by_its_first_line(tmp_path):
    rows = [list(r) for r in MMBENCH_TSV_ROWS]
    rows[0][2] = '"A hint\nover two lines."'  # how pandas writes a cell holding a newline
    rows[0][9] = "not base64!"
    write_tsv(tmp_path / "mmbench_dev_20230712.tsv", rows)
    raises(re.escape("mmbench_dev_20230712.tsv row 0 (line 2): field 'image' is not"), load_benchmark,
           "mmbench_en", tmp_path)
    rows[0][9] = b64(RED)
    rows[1][9] = "not base64!"
    write_tsv(tmp_path / "mmbench_dev_20230712.tsv", rows)
    raises(re.escape("mmbench_dev_20230712.tsv row 1 (line 4): field 'image' is not"), load_benchmark,
           "mmbench_en", tmp_path)
    rows[1][9] = b64(BLUE)
    write_tsv(tmp_path / "mmbench_dev_20230712.tsv", rows)
    assert load_benchmark("mmbench_en", tmp_path)[0].question.startswith("A hint\nover two lines. What is shown?")


def test_a_utf16_file_is_told_to_be_converted_from_utf16(tmp_path):
    """What Windows PowerShell's `>` and Notepad's "Unicode" write: not latin-1, as the generic advice says."""
    tsv = tmp_path / "mmbench_dev_20230712.tsv"
    write_tsv(tsv, MMBENCH_TSV_ROWS)
    tsv.write_bytes(tsv.read_text(encoding="utf-8").encode("utf-16"))
    raises(re.escape("mmbench_dev_20230712.tsv: is UTF-16 (it starts with UTF-16's byte-order mark), not UTF-8 as "
                     "the benchmark's files are; convert it (iconv -f utf-16 -t utf-8)"), load_benchmark,
           "mmbench_en", tsv)


def test_an_image_cell_holding_a_string_is_called_a_string(tmp_path):
    rows = [{**row, "image": b64(RED)} for row in pope_rows()]  # an image column of base64 text
    write_parquet(tmp_path / "pope.parquet", rows)
    raises(re.escape("pope.parquet row 0: field 'image' is a string ('iVBORw0KGgoAAAANSUhE'...), not an image; "
                     "expected an HF Image struct"), load_benchmark, "pope", tmp_path)
