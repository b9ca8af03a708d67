"""Official benchmark metrics (vtprune.eval.metrics): hand-computed scores on small answer lists, both
scoring rules on the same answers where they differ."""

import math
import re

import pytest

from vtprune.eval.metrics import (
    BadReference, SCORING_RULES, extract_mcq_answer, extract_mmbench_option, normalize_gqa_answer,
    normalize_vqa_answer, normalized_average, ocrbench_match, parse_mme_answer, parse_pope_answer,
    parse_scienceqa_option, relative_scores, score, vqa_soft_accuracy,
)


def approx(x):
    return pytest.approx(x, abs=1e-12)


# --- VQA normalisation and accuracy ----------------------------------------------------------------------

@pytest.mark.parametrize("raw, norm", [
    ("The two dogs.", "2 dogs"),           # article dropped, number word -> digit, final period dropped
    ("A cat", "cat"),
    ("an apple", "apple"),
    ("Hello, world!", "hello world"),      # commas deleted up front, "!" next to nothing -> space, squeezed
    ("3.5", "3.5"),                        # a period before a digit stays
    ("e.g.", "eg"),
    ("Dont", "don't"),                     # contraction restored
    ("dog's", "dog 's"),                   # EvalAI's "'s" split
    ("t-shirt", "t shirt"),                # "-" not next to a space -> space
    ("a - b", "b"),                        # "-" next to a space -> deleted; "a" is an article
    ("x -y-z", "x yz"),                    # one "-" next to a space: every "-" of the answer deleted
    ("none", "0"),
    ("  Ten\n", "10"),
    ("x." * 40, "x" * 33 + ".x" * 7 + "."),  # at most 32 periods removed (EvalAI's count=re.UNICODE)
    # EvalAI's word_tokenize deletes every "," and "?" before the punctuation pass, which would make a space
    ("x?y", "xy"),
    ("x,y", "xy"),
    # one "-" next to a space (on either side) deletes every "-" of the answer; else each becomes a space
    ("x -y-z", "x yz"),
    ("x\t-y-z", "x yz"),                    # a tab is a space by then: same as the line above
])
def test_vqa_normaliser(raw, norm):
    assert normalize_vqa_answer(raw) == norm


def test_vqa_soft_accuracy_ten_choose_nine():
    others = ["3", "4", "5", "6", "7", "8", "9"]
    # 3 humans say 2 (as "two", "2", "2."): leave one of them out -> 2 matches -> 2/3, leave another out -> 1
    assert vqa_soft_accuracy("Two.", ["two", "2", "2."] + others) == approx((3 * 2 / 3 + 7 * 1) / 10)
    # one human: 0 when that one is left out, 1/3 otherwise
    assert vqa_soft_accuracy("the 3", ["3"] + ["x"] * 9) == approx(9 * (1 / 3) / 10)
    assert vqa_soft_accuracy("cat", ["the cat"] * 4 + ["x"] * 6) == 1.0
    assert vqa_soft_accuracy("dog", ["cat"] * 10) == 0.0
    assert vqa_soft_accuracy("anything", []) == 0.0


def test_textvqa_counts_its_questions():
    # "n" is the number of questions scored, not of distinct accuracies (all three score 0 here)
    r = score("textvqa", ["a", "b", "c"], [{"answers": ["z"] * 10}] * 3)
    assert r["n"] == 3.0 and r["accuracy"] == 0.0


def test_textvqa_both_rules_same_number_llava_needs_ten_answers():
    refs = [{"answers": ["two", "2", "2."] + ["x"] * 7}, {"answers": ["A Cat"] * 10}, {"answers": ["stop"] * 10}]
    preds = ["2", "cat!", "go"]
    want = (0.9 + 1.0 + 0.0) / 3
    for rule in ("lmms-eval", "llava"):
        r = score("textvqa", preds, refs, scoring=rule)
        assert r["accuracy"] == approx(want)
        assert r["score"] == approx(100 * want)
    nine = [{"answers": ["cat"] * 9}]
    assert score("textvqa", ["cat"], nine, scoring="lmms-eval")["accuracy"] == 1.0
    with pytest.raises(ValueError, match="reference 0 has 9 answers"):
        score("textvqa", ["cat"], nine, scoring="llava")
    with pytest.raises(ValueError, match="reference 0 has 11 answers"):  # m4c asserts exactly ten
        score("textvqa", ["cat"], [{"answers": ["cat"] * 11}], scoring="llava")


def test_vizwiz_unanswerable_and_answer_dicts():
    refs = [
        {"answers": ["unanswerable"] * 10, "answer_type": "unanswerable"},
        {"answers": [{"answer": "red", "answer_confidence": "yes"}] * 2 + [{"answer": "blue"}] * 8,
         "answer_type": "other"},
        {"answers": [], "answer_type": "other"},  # lmms-eval: an empty answer list scores 0
    ]
    r = score("vizwiz", ["Unanswerable.", "Red", "red"], refs)
    red = 2 * (1 / 3) / 10 + 8 * (2 / 3) / 10  # two humans: 1/3 when one of them is out, 2/3 otherwise
    assert r["accuracy"] == approx((1.0 + red + 0.0) / 3)
    assert r["unanswerable/accuracy"] == 1.0
    assert r["other/accuracy"] == approx(red / 2)
    assert r["unanswerable_ratio"] == approx(1 / 3)
    # the official answer_type names the breakdown; a category is read only where it is missing
    both = score("vizwiz", ["red", "red"], [{"answers": ["red"] * 10, "answer_type": "other", "category": "colour"},
                                            {"answers": ["blue"] * 10, "category": "colour"}])
    assert (both["other/accuracy"], both["colour/accuracy"]) == (1.0, 0.0)


# --- GQA ---------------------------------------------------------------------------------------------------

def test_gqa_both_rules_differ_as_documented():
    preds = ["Yes.", "Yes!", "T-shirt", "The table", " no ", "yes..."]
    refs = [{"answer": a} for a in ("yes", "yes", "t-shirt", "table", "no", "yes")]
    assert normalize_gqa_answer("Yes!", "lmms-eval") == "yes"
    assert normalize_gqa_answer("Yes!", "llava") == "yes!"
    lm = score("gqa", preds, refs, scoring="lmms-eval")
    ll = score("gqa", preds, refs, scoring="llava")
    assert lm["accuracy"] == approx(5 / 6)  # all but "The table"
    assert ll["accuracy"] == approx(4 / 6)  # also "Yes!" wrong: only trailing periods go
    assert lm["score"] == approx(100 * 5 / 6)


# --- POPE --------------------------------------------------------------------------------------------------

POPE_PREDS = ["Yes", "Yes.", "No, there is not.", "no", "", "There is a cat.", "yes", "Not really", "no", "No"]
POPE_GOLD = ["yes", "yes", "no", "no", "yes", "yes", "no", "no", "yes", "no"]
POPE_SPLIT = ["random"] * 8 + ["adversarial"] * 2


def pope_refs():
    return [{"answer": g.capitalize(), "category": s, "question_id": i}
            for i, (g, s) in enumerate(zip(POPE_GOLD, POPE_SPLIT))]


def test_pope_parsers():
    lm = [parse_pope_answer(p, "lmms-eval") for p in POPE_PREDS]
    ll = [parse_pope_answer(p, "llava") for p in POPE_PREDS]
    assert lm == ["yes", "other", "other", "no", "other", "other", "yes", "other", "no", "no"]
    # llava: "Not" is not one of No/no/not, the empty answer is yes
    assert ll == ["yes", "yes", "no", "no", "yes", "yes", "yes", "yes", "no", "no"]
    assert parse_pope_answer("NO", "llava") == "yes"
    assert parse_pope_answer("Yes, but not clearly.", "llava") == "no"
    assert parse_pope_answer("Yes, but. No.", "llava") == "yes"  # only the first sentence counts
    # eval_pope cuts at the first "." and deletes commas before it splits on spaces: "No." and "No," are "No"
    assert parse_pope_answer("No.", "llava") == "no"
    assert parse_pope_answer("No, it is a cat", "llava") == "no"


def test_pope_lmms_eval_rule():
    r = score("pope", POPE_PREDS, pope_refs(), scoring="lmms-eval")
    # random: parsed yes,other,other,no,other,other,yes,other; TP=1 (row 0), FP=1 (row 6), FN=0
    assert r["random/accuracy"] == approx(2 / 8)
    assert r["random/precision"] == approx(0.5)
    assert r["random/recall"] == approx(1.0)  # "Yes." and "" on gold-yes rows are not false negatives
    assert r["random/f1"] == approx(2 / 3)
    assert r["random/yes_ratio"] == approx(2 / 8)
    assert r["random/gt_yes_ratio"] == approx(4 / 8)  # what lmms-eval prints as pope_yes_ratio
    assert r["random/other_ratio"] == approx(5 / 8)
    # adversarial: no (gold yes) and no (gold no): TP=FP=0 -> precision 0, recall 0/(0+1), f1 0
    assert r["adversarial/accuracy"] == approx(0.5)
    assert r["adversarial/precision"] == 0.0 and r["adversarial/f1"] == 0.0
    # headline = pooled over the splits (lmms-eval's `pope` task): TP=1, FP=1, FN=1
    assert r["accuracy"] == approx(3 / 10) == r["all/accuracy"]
    assert r["precision"] == approx(0.5) and r["recall"] == approx(0.5) and r["f1"] == approx(0.5)
    assert r["score"] == approx(50.0)


def test_pope_llava_rule_differs_on_same_answers():
    r = score("pope", POPE_PREDS, pope_refs(), scoring="llava")
    # random: TP=4 (rows 0,1,4,5), FP=2 (rows 6,7), TN=2, FN=0
    assert r["random/accuracy"] == approx(6 / 8)
    assert r["random/precision"] == approx(4 / 6)
    assert r["random/recall"] == approx(1.0)
    assert r["random/f1"] == approx(0.8)
    assert r["random/yes_ratio"] == approx(6 / 8)
    assert r["random/other_ratio"] == 0.0
    # adversarial: TP=FP=0 -> eval_pope would divide by zero; 0 here
    assert r["adversarial/precision"] == 0.0 and r["adversarial/f1"] == 0.0
    # headline = mean over splits (LLaVA-1.5's POPE number); pooled kept under all/
    assert r["f1"] == approx(0.4) and r["accuracy"] == approx((0.75 + 0.5) / 2)
    assert r["score"] == approx(40.0)
    assert r["all/f1"] == approx(8 / 11)  # TP=4, FP=2, FN=1
    lm = score("pope", POPE_PREDS, pope_refs(), scoring="lmms-eval")
    assert lm["random/accuracy"] < r["random/accuracy"]  # "Yes." / "No, there is not." count only under llava


def test_pope_label_alias_and_bad_gold():
    r = score("pope", ["yes", "no"], [{"label": "yes"}, {"label": "no"}], scoring="llava")
    assert r["accuracy"] == 1.0 and r["all/n"] == 2
    with pytest.raises(ValueError, match="reference 1 answer is 'maybe'"):
        score("pope", ["yes", "no"], [{"answer": "yes"}, {"answer": "maybe"}])
    with pytest.raises(ValueError, match="reference 0 has no field 'answer' or 'label'"):
        score("pope", ["yes"], [{"category": "random"}])


# --- MME ---------------------------------------------------------------------------------------------------

MME_REFS = [
    {"question_id": "existence/1.png", "category": "existence", "answer": "Yes"},
    {"question_id": "existence/1.png", "category": "existence", "answer": "No"},
    {"question_id": "existence/2.png", "category": "existence", "answer": "Yes"},
    {"question_id": "existence/2.png", "category": "existence", "answer": "No"},
    {"question_id": "code_reasoning/7.png", "answer": "Yes"},  # category from the question_id
    {"question_id": "code_reasoning/7.png", "answer": "No"},
]
MME_PREDS = ["Yes", "N", "Y", "No.", "Yes, it is.", "yes"]


def test_mme_parsers():
    assert [parse_mme_answer(p, "lmms-eval") for p in ("Y", "N", "n.", "x", "", "Nope", "I don't")] == \
        ["yes", "no", "no", "other", "other", "no", "other"]
    # both rules look for yes/no in the first 4 characters: "(yes)" is yes, "I no" no, "I say yes" neither
    for rule in ("lmms-eval", "llava"):
        assert [parse_mme_answer(p, rule) for p in ("(yes)", "I no", "I say yes")] == ["yes", "no", "other"]
    assert [parse_mme_answer(p, "llava") for p in ("Y", "N", "n.", "x", "", "Nope", "I don't")] == \
        ["other", "other", "other", "other", "other", "no", "other"]
    assert parse_mme_answer("The answer is yes", "lmms-eval") == "other"  # only the first 4 characters
    # the first 4 characters, not 3: "(yes" holds "yes" (calculation.py and lmms-eval's parse_pred_ans alike)
    assert parse_mme_answer("(Yes)", "lmms-eval") == "yes" and parse_mme_answer("(Yes)", "llava") == "yes"


def test_mme_gold_with_a_period_is_read_as_lmms_eval_reads_it():
    # lmms-eval: gt_ans = doc["answer"].lower().strip().replace(".", ""), so "Yes." is the gold "yes"
    refs = [{"question_id": "existence/1.png", "answer": "Yes."}, {"question_id": "existence/1.png", "answer": "No."}]
    r = score("mme", ["Yes", "No"], refs)
    assert r["existence/acc"] == 100.0 and r["existence/acc_plus"] == 100.0


def test_mme_acc_plus_and_totals_both_rules():
    lm = score("mme", MME_PREDS, MME_REFS, scoring="lmms-eval")
    assert lm["existence/acc"] == approx(100.0) and lm["existence/acc_plus"] == approx(100.0)
    # code_reasoning: one of the image's two questions wrong -> acc 50, acc+ 0
    assert lm["code_reasoning/acc"] == approx(50.0) and lm["code_reasoning/acc_plus"] == 0.0
    assert lm["perception"] == approx(200.0) and lm["cognition"] == approx(50.0)
    assert lm["score"] == approx(250.0)
    ll = score("mme", MME_PREDS, MME_REFS, scoring="llava")
    # "N" and "Y" are other under llava: existence right on 2 of 4 questions, no image fully right
    assert ll["existence/acc"] == approx(50.0) and ll["existence/acc_plus"] == 0.0
    assert ll["existence/score"] == approx(50.0)
    assert ll["code_reasoning/score"] == approx(50.0)
    assert ll["perception"] == approx(50.0) and ll["score"] == approx(100.0)
    assert "count/acc" not in ll  # only the subtasks present


def test_mme_errors():
    with pytest.raises(ValueError, match="reference 0 is one of 1 questions on image") as raised:
        score("mme", ["yes"], MME_REFS[:1])
    assert raised.value.index == 0
    with pytest.raises(ValueError, match="'texture' is not an MME subtask"):
        score("mme", ["yes", "no"], [{"question_id": "a", "category": "texture", "answer": "Yes"}] * 2)


# --- MMBench -----------------------------------------------------------------------------------------------

def mmb_row(index, answer, opts, category="attribute"):
    row = {"index": index, "answer": answer, "category": category, "L2-category": "perception"}
    row.update(zip("ABCD", opts))
    return row


def test_mmbench_option_extraction():
    opts = {"A": "dog", "B": "cat", "C": "bird", "D": None}
    assert extract_mmbench_option("B", opts) == "B"
    assert extract_mmbench_option("B. cat", opts) == "B"
    assert extract_mmbench_option("The answer is (C).", opts) == "C"
    assert extract_mmbench_option("A cat is on the mat", opts) == "B"  # "A" read as the article; text "cat"
    assert extract_mmbench_option("a bird", opts) == "C"
    assert extract_mmbench_option("I don't know", opts) == ""
    assert extract_mmbench_option("答案是C", {"A": "狗", "B": "猫", "C": "鸟"}) == "C"
    assert extract_mcq_answer("Option (B) is wrong, so the answer is D", ["A", "B", "C", "D"]) == "D"
    # lmms-eval's extractor, form by form (start 10 > end 9 > phrase 7 > (X) 6 > ... > X-space 2; ties: the later)
    cases = {
        "(A) or (B)": "B",                            # two of a form: the later
        "Apple is B": "B",                            # a word's first letter is no start
        "(B) has DNA": "B",                           # a word's last letter is no end
        "Is it B or A?": "A",                         # trailing punctuation stripped first: "A" ends the answer
        "Is A or B? the answer is A, surely": "A",    # a letter after the phrase, not before it
        "the answer is B, not A": "A",                # every letter after the phrase is a candidate: the later
    }
    assert {text: extract_mcq_answer(text, ["A", "B"]) for text in cases} == cases


def test_mmbench_option_extraction_follows_can_infer():
    """MMBench_Evaluator.can_infer: can_infer_option (letters A-E) first, then can_infer_text, then (static path)
    extract_mcq_answer over the options; each expected letter traced by hand through those three steps."""
    opts = {"A": "dog", "B": "cat", "C": "bird", "D": "fish"}
    # 4 tokens is "more than 3": the bare "A" is taken for the article, and the option text "cat" decides
    assert extract_mmbench_option("A cat is here", opts) == "B"
    # two bare letters: can_infer_option and can_infer_text fail; extract_mcq_answer's "start" (10) beats "end" (9)
    assert extract_mmbench_option("C B", opts) == "C"
    # a marked letter ("B.") is read before any option text ("dog" is A's)
    assert extract_mmbench_option("B. dog", opts) == "B"
    # can_infer_option looks for A-E: the one bare letter "E" is returned (a wrong answer), "B." is never reached
    assert extract_mmbench_option("E B.", opts) == "E"


def test_extract_mcq_answer_ranks_formats_as_lmms_eval_does():
    """lmms-eval's mcq_extract: priorities start 10 > end 9 > phrase 7 > (X) 6 > X. 5 > X: 4 > X) 3 > "X " 2,
    a bare occurrence only when nothing else is found; ties go to the later position."""
    abcd = ["A", "B", "C", "D"]
    assert extract_mcq_answer("B is better than C", abcd) == "B"                  # start over end
    assert extract_mcq_answer("Because of this, C", abcd) == "C"                  # "Be..." is no standalone B
    assert extract_mcq_answer("(B) by SID", abcd) == "B"                          # "...ID" is no standalone D
    assert extract_mcq_answer("(C) is wrong; the answer is B here", abcd) == "B"  # phrase over parentheses
    assert extract_mcq_answer("(C) is wrong; I CHOOSE B now", abcd) == "B"        # phrases match in any case
    assert extract_mcq_answer("(B) then (A) then (B) again", abcd) == "B"         # last (B) is after (A)
    assert extract_mcq_answer("(B) is wrong, so C.", abcd) == "C"                 # end punctuation stripped first
    assert extract_mcq_answer("the B-side", abcd) == "B"                          # fallback: any occurrence


def test_mmbench_scores_the_options_its_prompt_lists():
    """The scorer's options are the cells the prompt lists (`listed_option`). A cell reading "nan" is no option,
    where lmms-eval's scorer would read it as the text "nan" and find "banana" naming two options; a cell of
    spaces is an option, as in lmms-eval, so "x y" names two and is unreadable."""
    assert score("mmbench_en", ["banana"], [mmb_row(0, "A", ["banana", "apple", "nan", "nan"])])["accuracy"] == 1.0
    assert score("mmbench_en", ["x y"], [mmb_row(0, "A", ["x", " "])])["accuracy"] == 0.0
    assert score("mmbench_en", ["B"], [mmb_row(0, "B", ["x", " "])])["accuracy"] == 1.0  # a gold of spaces is valid


def test_mmbench_categories_come_from_the_original_row():
    # lmms-eval's eval_result takes a question's category from its index < 1e6 row (cate_map[idx] of data_main),
    # whatever order the rows come in
    refs = [mmb_row(1_000_001, "A", ["cat", "dog"], "from-rotation"), mmb_row(1, "B", ["dog", "cat"], "from-original")]
    r = score("mmbench_en", ["A", "B"], refs)
    assert r["category/from-original"] == 1.0 and "category/from-rotation" not in r


def test_mmbench_circular_one_rotation_wrong():
    opts = ["dog", "cat", "bird", "fish"]
    rot = [opts[k:] + opts[:k] for k in range(4)]  # the 4 circular copies: options shifted by k
    refs = [mmb_row(1 + k * 1_000_000, "ABCD"[r.index("cat")], r) for k, r in enumerate(rot)]
    gold = [ref["answer"] for ref in refs]
    assert gold == ["B", "A", "D", "C"]
    refs += [mmb_row(2, "A", ["red", "blue"], "color"), mmb_row(1_000_002, "B", ["blue", "red"], "color")]
    preds = ["B", "A. cat", "(D)", "A",  # question 1: rotation 3 wrong (gold C)
             "red", "The answer is B."]  # question 2: right in both rotations (option text, then letter)
    for task in ("mmbench_en", "mmbench_cn"):
        r = score(task, preds, refs)
        assert r["accuracy"] == approx(0.5) and r["score"] == approx(50.0)
        assert r["n_questions"] == 2 and r["n_rows"] == 6
        assert r["category/attribute"] == 0.0 and r["category/color"] == 1.0
        assert r["l2_category/perception"] == approx(0.5)
    fixed = preds[:3] + ["C"] + preds[4:]
    assert score("mmbench_en", fixed, refs)["accuracy"] == 1.0
    # a question's categories are its original row's, wherever that row comes; l2-category is the lower-case spelling
    rotated_first = [mmb_row(1_000_003, "A", ["x", "y"], "other"), mmb_row(3, "B", ["y", "x"], "attribute")]
    rotated_first[1]["l2-category"] = rotated_first[1].pop("L2-category")
    r = score("mmbench_en", ["A", "B"], rotated_first)
    assert (r["category/attribute"], r["l2_category/perception"]) == (1.0, 1.0) and "category/other" not in r
    with pytest.raises(ValueError, match="answer 'E' is not one of its options"):
        score("mmbench_en", ["A"], [mmb_row(3, "E", ["x", "y"])])


# --- ScienceQA-IMG -----------------------------------------------------------------------------------------

def test_scienceqa_both_rules_differ_as_documented():
    preds = ["A", "b", "B.", "C. dog", "The answer is B.", "(A)", "E"]
    gold = [0, 1, 1, 2, 1, 0, 0]
    refs = [{"choices": ["cat", "bird", "dog"], "answer": g} for g in gold]
    assert [parse_scienceqa_option(p, 3, "lmms-eval") for p in preds] == [0, 1, 1, 2, -1, -1, -1]
    assert [parse_scienceqa_option(p, 3, "llava") for p in preds] == [0, -1, -1, 2, 1, -1, -1]
    lm = score("scienceqa_img", preds, refs, scoring="lmms-eval")
    ll = score("scienceqa_img", preds, refs, scoring="llava")
    assert lm["accuracy"] == approx(4 / 7) and ll["accuracy"] == approx(3 / 7)
    assert lm["unparsed_ratio"] == approx(3 / 7) and ll["unparsed_ratio"] == approx(4 / 7)
    assert score("sqa", ["B"], [{"choices": ["x", "y"], "answer": "B"}])["accuracy"] == 1.0  # letter gold, alias
    # llava: "The answer is X." must occur exactly once; twice is a failed parse
    assert parse_scienceqa_option("The answer is A. The answer is B.", 3, "llava") == -1
    # unparsed counts answers with no valid option, not wrong ones: "C" is read, and wrong
    assert score("scienceqa_img", ["C", "?"], refs[:2])["unparsed_ratio"] == 0.5
    with pytest.raises(BadReference, match="answer 2 is outside its 2 choices"):  # index == len(choices)
        score("scienceqa_img", ["A"], [{"choices": ["x", "y"], "answer": 2}])


# --- OCRBench ----------------------------------------------------------------------------------------------

def test_ocrbench_case_whitespace_and_categories():
    refs = [
        {"question_type": "Regular Text Recognition", "dataset": "IIIT5K", "answer": ["Hello"]},
        {"question_type": "Handwritten Mathematical Expression Recognition", "dataset": "HME100k",
         "answer": ["x ^ { 2 }"]},
        {"question_type": "Handwritten Mathematical Expression Recognition", "dataset": "HME100k", "answer": ["X"]},
        {"question_type": "Doc-oriented VQA", "dataset": "docVQA", "answer": "ＡＢＣ"},  # fullwidth gold
        {"question_type": "Key Information Extraction", "dataset": "SROIE", "answer": ["12 Main St", "12 main street"]},
        {"question_type": "Scene Text-centric VQA", "dataset": "textVQA", "answer": ["stop"]},
    ]
    preds = ["  HELLO world\n", "The formula: x^{2}", "x", "abc", "12 Main\nSt", ""]
    r = score("ocrbench", preds, refs)
    # matched: 0 (case), 1 (HME spaces removed), 3 (fullwidth folded), 4 (newline -> space); 2 is case-kept HME
    assert r["final_score"] == 4.0 and r["score"] == 4.0
    assert r["text_recognition"] == 1.0
    assert r["Handwritten Mathematical Expression Recognition"] == 1.0
    assert r["Scene Text-centric VQA"] == 0.0
    assert r["accuracy"] == approx(4 / 6)
    assert not ocrbench_match("X", ["x"], "HME100k")  # case is kept on both sides
    assert ocrbench_match("ＡＢＣ", ["abc"], "docVQA")  # fullwidth folded on the prediction's side too
    with pytest.raises(ValueError, match="question_type 'Poetry' is not an OCRBench category"):
        score("ocrbench", ["x"], [{"question_type": "Poetry", "dataset": "x", "answer": ["x"]}])


def test_ocrbench_match_normalises_each_side_as_lmms_eval_does():
    # HME100k: spaces removed from the prediction too, case kept
    assert ocrbench_match("x ^{2}", ["x^{2}"], "HME100k")
    assert not ocrbench_match("X^{2}", ["x^{2}"], "HME100k")
    # other sources: fullwidth ASCII folded in the prediction too, the gold stripped
    assert ocrbench_match("ＳＴＯＰ here", ["stop"], "textVQA")
    assert ocrbench_match("the cat.", [" cat "], "IIIT5K")


# --- registry, errors, normalized average ------------------------------------------------------------------

def test_registry_and_rule_errors():
    assert set(SCORING_RULES) == {
        "textvqa", "vizwiz", "gqa", "pope", "mme", "mmbench_en", "mmbench_cn", "scienceqa_img", "ocrbench", "videomme"}
    with pytest.raises(ValueError, match=r"unknown task 'vqav2'; valid: textvqa, vizwiz, gqa"):
        score("vqav2", ["x"], [{"answer": "x"}])
    with pytest.raises(ValueError, match=r"task 'vizwiz' has no scoring rule 'llava'; valid: lmms-eval$"):
        score("vizwiz", ["x"], [{"answers": ["x"]}], scoring="llava")
    with pytest.raises(ValueError, match=r"task 'pope' has no scoring rule 'official'; valid: lmms-eval, llava"):
        score("pope", ["yes"], [{"answer": "yes"}], scoring="official")
    with pytest.raises(ValueError, match="has no scoring rule 'llava'"):
        score("ocrbench", ["x"], [{}], "llava")
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        score("gqa", ["a", "b"], [{"answer": "a"}])
    with pytest.raises(ValueError, match="no predictions"):
        score("gqa", [], [])
    with pytest.raises(ValueError, match="not one string"):  # list("a") would pair with the one reference
        score("gqa", "a", [{"answer": "a"}])
    with pytest.raises(ValueError, match="gqa: reference 1 has no field 'answer'"):
        score("gqa", ["a", "b"], [{"answer": "a"}, {"gold": "b"}])
    # None is an empty answer; generators work
    assert score("gqa", iter([None]), iter([{"answer": "yes"}]))["accuracy"] == 0.0


def test_normalized_average():
    pruned = {"gqa": 60.0, "pope": {"score": 80.0, "f1": 0.8}, "mme": score("mme", MME_PREDS, MME_REFS, "llava")}
    unpruned = {"gqa": 80.0, "pope": 80.0, "mme": score("mme", MME_PREDS, MME_REFS, "lmms-eval")}
    assert relative_scores(pruned, unpruned) == {"gqa": approx(0.75), "pope": approx(1.0), "mme": approx(0.4)}
    assert normalized_average(pruned, unpruned) == approx((0.75 + 1.0 + 0.4) / 3)
    with pytest.raises(ValueError, match=r"only pruned: \['mme'\], only unpruned: \[\]"):
        normalized_average(pruned, {"gqa": 1.0, "pope": 1.0})
    with pytest.raises(ValueError, match="unpruned score for 'gqa' is 0"):
        normalized_average({"gqa": 1.0}, {"gqa": 0.0})
    assert not math.isnan(normalized_average({"x": 0.0}, {"x": 2.0}))
    assert normalized_average({"gqa": 30.0}, {"gqa": 60.0}) == 0.5  # one benchmark: its own ratio


def test_a_bad_reference_names_its_row():
    """Every reference the metric cannot score is a BadReference carrying its index, so a caller can name the
    file line or benchmark row it came from."""
    with pytest.raises(BadReference) as raised:
        score("pope", ["yes"] * 3, [{"answer": "yes"}, {"answer": "no"}, {"answer": "Yes."}])
    assert raised.value.index == 2 and raised.value.task == "pope"
    with pytest.raises(BadReference, match="reference 1 has 9 answers") as raised:
        score("textvqa", ["a", "a"], [{"answers": ["a"] * 10}, {"answers": ["a"] * 9}], scoring="llava")
    assert raised.value.index == 1


def test_pope_rows_without_a_category_beside_categorised_ones_are_refused():
    # they would pool under the split name "all", the name of the pooled keys
    refs = [{"answer": "yes"}, {"answer": "no"}, {"answer": "no", "category": "random"}]
    with pytest.raises(BadReference, match="reference 0 has no category while others have one") as raised:
        score("pope", ["yes", "yes", "no"], refs)
    assert raised.value.index == 0
    uncategorised = score("pope", ["yes", "no"], refs[:2])
    assert uncategorised["f1"] == uncategorised["all/f1"] == 1.0


def test_a_pope_category_that_is_no_split_is_refused_as_the_loader_refuses_it():
    # a typo was scored as a split of its own ("randm/f1"), and under the llava rule averaged into the headline
    refs = [{"answer": "yes", "category": "random"}, {"answer": "no", "category": "randm"}]
    with pytest.raises(BadReference, match=re.escape("reference 1 field 'category' is 'randm', not a POPE split; "
                                                     "expected adversarial, popular, random, or no category")):
        score("pope", ["yes", "no"], refs)
    with pytest.raises(BadReference, match=re.escape("is 'existence', not a POPE split (an MME subtask")):
        score("pope", ["yes"], [{"answer": "yes", "category": "existence"}])
    # a blank category is none, as the loader reads it (pandas writes a blank cell as "nan")
    assert score("pope", ["yes", "no"], [{"answer": "yes", "category": ""}, {"answer": "no", "category": "nan"}]
                 )["all/n"] == 2.0


@pytest.mark.parametrize("answers", ["  ", [""], ["12", " "]])
def test_ocrbench_refuses_a_blank_answer(answers):
    # the official substring rule would give every prediction the point
    ref = {"answer": answers, "dataset": "IIIT5K", "question_type": "Regular Text Recognition"}
    with pytest.raises(BadReference, match="blank answer matches every prediction"):
        score("ocrbench", ["anything"], [ref])


def test_videomme_is_lmms_evals_option_accuracy():
    refs = [{"answer": a, "duration": d, "domain": dom, "task_type": t, "videoID": v} for a, d, dom, t, v in [
        ("A", "short", "Knowledge", "OCR Problems", "001"), ("C", "short", "Knowledge", "Counting Problem", "001"),
        ("B", "medium", "Sports Competition", "Action Reasoning", "002"),
        ("D", "long", "Multilingual", "Information Synopsis", "003")]]
    # lmms-eval's extract_mcq_answer over A-D reads "A", "C", "D" and "" (no letter): right, right, wrong, wrong
    preds = ["A", "The answer is (C).", "D. a dog", "I cannot tell"]
    result = score("videomme", preds, refs)
    assert result["score"] == pytest.approx(50.0) and result["accuracy"] == pytest.approx(0.5)
    assert result["short/accuracy"] == 1.0 and result["medium/accuracy"] == 0.0 and result["long/accuracy"] == 0.0
    assert result["domain/Knowledge"] == 1.0 and result["task/Action Reasoning"] == 0.0
    # the letters are read over A-D only: "E B" starts with no option letter and ends with B
    assert score("videomme", ["E B"], [{**refs[2]}])["accuracy"] == 1.0
    with pytest.raises(BadReference, match="reference 0 answer is 'E', expected an option letter A-D"):
        score("videomme", ["A"], [{**refs[0], "answer": "E"}])
    with pytest.raises(ValueError, match="no scoring rule 'llava'"):
        score("videomme", preds, refs, scoring="llava")


# --- reference fields of the wrong type: a BadReference naming the row and field, never a coerced score -------

OCR = {"dataset": "IIIT5K", "question_type": "Regular Text Recognition"}


@pytest.mark.parametrize("task, pred, ref, message", [
    # a number where a list of answers belongs was a TypeError traceback
    ("textvqa", "a", {"answers": 5}, "field 'answers' is 5, expected a non-empty list of strings"),
    ("vizwiz", "a", {"answers": 5}, "field 'answers' is 5, expected a list of strings"),
    ("ocrbench", "5", {"answer": 5, **OCR}, "field 'answer' is 5, expected a string or a non-empty list"),
    # a mapping was read as the list of its keys
    ("textvqa", "a", {"answers": {"a": 1}}, r"field 'answers' is \{'a': 1\}"),
    ("textvqa", "a", {"answers": ["a", 1]}, "field 'answers' holds 1, expected strings"),
    # the loader refuses an empty OCRBench answer list; scored as a miss before
    ("ocrbench", "x", {"answer": [], **OCR}, r"field 'answer' is \[\], expected a string or a non-empty list"),
    ("ocrbench", "5", {"answer": [5], **OCR}, "field 'answer' holds 5, expected strings"),
    # a non-string source silently picked the non-HME100k rule
    ("ocrbench", "x", {"answer": "x", "dataset": ["HME100k"], "question_type": "Regular Text Recognition"},
     "field 'dataset' is list"),
    # a fraction or a bool is no option index (1.9 and True were read as option 1)
    ("scienceqa_img", "B", {"choices": ["a", "b", "c"], "answer": 1.9}, "field 'answer' is 1.9, expected the gold"),
    ("scienceqa_img", "B", {"choices": ["a", "b", "c"], "answer": True}, "field 'answer' is True"),
    ("scienceqa_img", "A", {"choices": ["a", 2]}, "field 'choices' holds 2, expected strings"),
    ("mmbench_en", "A", {"index": 1.7, "answer": "A", "A": "a", "B": "b"}, "field 'index' is 1.7, expected an integer"),
    ("mmbench_en", "A", {"index": True, "answer": "A", "A": "a", "B": "b"}, "field 'index' is True"),
    # an unhashable category was a TypeError; a falsy one was replaced by the question_id's subtask
    ("mme", "yes", {"question_id": "existence/1.png", "category": ["existence"], "answer": "Yes"},
     r"category \['existence'\] is not an MME subtask"),
    ("mme", "yes", {"question_id": "existence/1.png", "category": [], "answer": "Yes"}, r"category \[\] is not"),
    ("mme", "yes", {"question_id": 1, "category": "existence", "answer": "Yes"}, "field 'question_id' is int 1"),
    ("pope", "yes", {"answer": "yes", "category": 5}, "field 'category' is 5, not a POPE split"),
    ("videomme", "A", {"answer": "A", "duration": "short", "videoID": ["v"]}, "field 'videoID' is list"),
])
def test_a_reference_field_of_the_wrong_type_is_refused(task, pred, ref, message):
    refs = [{"answers": ["a"] * 10}, ref] if task == "textvqa" else [ref]  # the index names the row, not 0
    with pytest.raises(BadReference, match=f"reference {len(refs) - 1} {message}") as raised:
        score(task, [pred] * len(refs), refs)
    assert raised.value.index == len(refs) - 1


def test_integral_numbers_still_read_as_indices_as_the_loader_reads_them():
    # pandas stores an int column with blanks as floats; the loader (fields._integer) accepts 1.0 and "1"
    for gold in (1, 1.0, "1", "B"):
        assert score("scienceqa_img", ["B"], [{"choices": ["a", "b"], "answer": gold}])["accuracy"] == 1.0
    refs = [mmb_row(2.0, "A", ["x", "y"]), mmb_row("1000002", "B", ["y", "x"])]
    assert score("mmbench_en", ["A", "B"], refs)["n_questions"] == 1.0


def test_answer_lists_of_strings_or_answer_dicts_still_score():
    assert score("textvqa", ["a"], [{"gt_answers": ("a",) * 10}])["accuracy"] == 1.0
    assert score("vizwiz", ["a"], [{"answers": [{"answer": "a"}] * 10}])["accuracy"] == 1.0
    assert score("ocrbench", ["an x"], [{"answer": ["y", "x"], **OCR}])["score"] == 1.0
    with pytest.raises(BadReference, match="field 'gt_answers' is 'a'"):  # names the field the row has
        score("textvqa", ["a"], [{"gt_answers": "a"}])


def test_a_predictions_file_that_is_not_utf8_names_the_file_and_line(tmp_path):
    from vtprune.eval.predictions import read_predictions

    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prediction": "yes", "answer": "yes"}\n{"prediction": "caf\xe9", "answer": "no"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl line 2: byte 0xe9 is not UTF-8; save the file as UTF-8"):
        read_predictions(path)
    path.write_bytes('{"prediction": "café", "answer": "no"}\r\n\r\n{"prediction": "x", "answer": "y"}'.encode())
    assert read_predictions(path) == (["café", "x"], [{"answer": "no"}, {"answer": "y"}], [1, 3])
    path.write_bytes('{"prediction": "yes", "answer": "yes"}\r\n'.encode("utf-16"))  # PowerShell's `>`
    with pytest.raises(ValueError, match=r"p.jsonl: is UTF-16 \(it starts with UTF-16's byte-order mark"):
        read_predictions(path)


@pytest.mark.parametrize("second, message", [
    ('[1]', "line 2: not a JSON object"),
    ('"prediction"', "line 2: not a JSON object"),  # a string holds "prediction" as `in` reads it
    # the same answer given twice is refused however its writer ordered the fields
    ('{"answer": "yes", "question_id": 7, "prediction": "yes"}', "line 2: repeats line 1 whole"),
])
def test_a_predictions_line_that_cannot_be_scored_once_is_named(tmp_path, second, message):
    from vtprune.eval.predictions import read_predictions

    path = tmp_path / "p.jsonl"
    path.write_text('{"prediction": "yes", "answer": "yes", "question_id": 7}\n' + second + "\n")
    with pytest.raises(ValueError, match=f"p.jsonl {message}"):
        read_predictions(path)


def test_a_prediction_may_be_null(tmp_path):
    from vtprune.eval.predictions import read_predictions

    path = tmp_path / "p.jsonl"
    path.write_text('{"prediction": null, "answer": "no"}\n')  # a question left unanswered: score reads it as ""
    assert read_predictions(path) == ([None], [{"answer": "no"}], [1])
