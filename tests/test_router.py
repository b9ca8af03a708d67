"""The rule-based router against benchmark-style questions labelled by hand.

Labelling convention: the class is the evidence needed for the ANSWER. So
"what color is the car left of the man?" is attribute (the relation only picks the
object), "how many cars are left of the bus?" is count, "is there a fence behind the
horse?" is spatial (the answer hinges on the relation), "is there a red car?" is
existence, "are there two dogs?" is count, "is the cat white?" is attribute, and
scene / artwork / celebrity / landmark / activity / reasoning questions are general.
"""

import re

import pytest

from vtprune.eval.loaders import (_MMBENCH_CN_POST, _OPTION_LETTER, _SHORT_ANSWER, _VIDEOMME_OPTIONS,
                                  _VIZWIZ_POST)
from vtprune.router import CLASSES, checked, instruction, route

TABLE: list[tuple[str, str]] = [
    # --- ocr ---
    ("what word is written on the red plate ?", "ocr"),  # synthetic benchmark
    ("what is the brand name on the bottle?", "ocr"),
    ("What does the sign say?", "ocr"),
    ("what number is on the player's jersey?", "ocr"),
    ("what is the title of the book?", "ocr"),
    ("what is the name of the restaurant?", "ocr"),
    ("what year is printed on the coin?", "ocr"),
    ("Is the word in the logo 'Starbucks'? Please answer yes or no.", "ocr"),  # MME OCR
    ("Is the phone number in the picture '0131 555 6363'?", "ocr"),
    ("What website is advertised on the side of the bus?", "ocr"),
    ("Which of the following is the text on the banner? A. SALE B. OPEN C. CLOSED D. EXIT", "ocr"),
    ("what does the license plate read?", "ocr"),
    ("招牌上写着什么字？", "ocr"),
    ("这本书的标题是什么？", "ocr"),
    ("图片中的文字是什么？", "ocr"),
    # --- count ---
    ("how many red triangles are there ?", "count"),  # synthetic benchmark
    ("How many people are in the picture?", "count"),
    ("How many cars are parked to the left of the truck?", "count"),
    ("Are there two dogs in the image? Please answer yes or no.", "count"),  # MME count
    ("Is there only one person in the picture?", "count"),
    ("Are there more cats than dogs?", "count"),
    ("What is the number of birds on the wire?", "count"),
    ("Count the apples on the table.", "count"),
    ("How many red balloons are visible?", "count"),
    ("Are there three giraffes in this picture?", "count"),
    ("How many of the chairs are empty? A. 1 B. 2 C. 3 D. 4", "count"),
    ("Is the number of plates equal to the number of cups?", "count"),
    ("图中有几只猫？", "count"),
    ("图片里一共有多少辆汽车？", "count"),
    ("桌子上有三个苹果吗？", "count"),
    # --- attribute ---
    ("what color is the triangle ?", "attribute"),  # synthetic benchmark
    ("what shape is the blue object ?", "attribute"),  # synthetic benchmark
    ("What color is the car to the left of the man?", "attribute"),  # GQA
    ("What is the table made of?", "attribute"),
    ("What is the woman wearing?", "attribute"),
    ("Is the cat in the image white? Please answer yes or no.", "attribute"),  # MME color
    ("Is the bus big or small?", "attribute"),
    ("What material is the fence?", "attribute"),
    ("What is the color of the umbrella? A. red B. blue C. green D. black", "attribute"),  # MMBench
    ("Which is larger, the elephant or the dog?", "attribute"),
    ("Is the man on the right wearing glasses?", "attribute"),
    ("Are the leaves green or brown?", "attribute"),
    ("这辆车是什么颜色的？", "attribute"),
    ("这个桌子是用什么材料做的？", "attribute"),
    ("左边那个女人穿着什么衣服？", "attribute"),
    # --- spatial ---
    ("where is the black cross relative to the purple triangle ?", "spatial"),  # synthetic benchmark
    ("Is the motorcycle on the right side of the bus? Please answer yes or no.", "spatial"),  # MME position
    ("What is to the left of the laptop?", "spatial"),
    ("Where is the cat sitting?", "spatial"),
    ("Is the lamp above or below the painting?", "spatial"),
    ("Which object is closest to the camera? A. chair B. table C. lamp", "spatial"),  # MMBench
    ("Is there a fence behind the horse?", "spatial"),  # GQA relation
    ("What is the man standing next to?", "spatial"),
    ("Which side of the plate is the fork on?", "spatial"),
    ("Is the cup in front of the vase?", "spatial"),
    ("In which part of the image is the dog located?", "spatial"),
    ("What is between the two trees?", "spatial"),
    ("猫在狗的左边还是右边？", "spatial"),
    ("钟在图片中的什么位置？", "spatial"),
    ("沙发旁边是什么东西？", "spatial"),
    # --- existence ---
    ("is there a yellow cross in the image ?", "existence"),  # synthetic benchmark
    ("Is there a dog in the image?", "existence"),  # POPE
    ("Is there a snowboard in the image?", "existence"),  # POPE
    ("Is there a red car in the image?", "existence"),
    ("Are there any people in this photo?", "existence"),
    ("Does the image contain a bicycle?", "existence"),
    ("Is there a person wearing a hat in the image?", "existence"),
    ("Do you see a traffic light in the picture?", "existence"),
    ("Is a laptop visible in this image?", "existence"),
    ("Can you see any birds?", "existence"),
    ("Is there a clock in this image? Please answer yes or no.", "existence"),  # MME existence
    ("Are there any apples on the table? A. yes B. no", "existence"),
    ("图中有狗吗？", "existence"),
    ("图片里有没有自行车？", "existence"),
    ("这张图片中是否存在汽车？", "existence"),
    # --- general ---
    ("what color are most of the objects ?", "general"),  # synthetic benchmark
    ("which half of the image has the most objects ?", "general"),  # synthetic benchmark
    ("Which of the following best describes the scene?", "general"),  # MMBench
    ("What is the man doing?", "general"),
    ("Where was this photo taken?", "general"),
    ("Is this photo taken in a place of bowling alley? Please answer yes or no.", "general"),  # MME scene
    ("Is this artwork created by Vincent van Gogh?", "general"),  # MME artwork
    ("Does this artwork exist in the form of painting?", "general"),  # MME artwork
    ("Is the actor inside the red bounding box named Tom Hanks?", "general"),  # MME celebrity
    ("Is this a photo of the Eiffel Tower?", "general"),  # MME landmark
    ("What is the mood of the image? A. happy B. sad C. tense D. calm", "general"),
    ("What season is it in the picture?", "general"),
    ("Why is the man holding an umbrella?", "general"),
    ("What type of room is this?", "general"),
    ("这张图片描述的是什么场景？", "general"),
    ("图中的人在做什么？", "general"),
    ("这幅画的作者是谁？", "general"),
]


def _is_chinese(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


def test_table_is_balanced():
    assert len(TABLE) >= 72
    assert len({q for q, _ in TABLE}) == len(TABLE), "duplicate questions"
    for name in CLASSES:
        assert sum(label == name for _, label in TABLE) >= 10, name
    assert sum(_is_chinese(q) for q, _ in TABLE) >= 14


def test_every_labelled_question_routes_to_its_label():
    """Each rule has questions here that only it routes right: one broken rule shows as its questions' misses."""
    misses = [(q, want, route(q)) for q, want in TABLE if route(q) != want]
    report = "\n".join(f"  {q!r}: want {want}, got {got}" for q, want, got in misses)
    assert not misses, f"{len(misses)} of {len(TABLE)} routed elsewhere:\n{report}"


def test_a_question_no_rule_matches_is_general():
    assert [route(q) for q in ("hello", "Describe this.", "这是什么？")] == ["general"] * 3


def test_a_conversation_is_routed_by_its_last_question():
    prompt = TEMPLATES["llava-1.5"]("How many dogs are there?") + " Two. USER: What color is the left dog? ASSISTANT:"
    assert instruction(prompt) == "What color is the left dog?" and route(instruction(prompt)) == "attribute"


@pytest.mark.parametrize(
    "question, label",
    [
        ("what word is written on the red plate ?", "ocr"),
        ("how many red triangles are there ?", "count"),
        ("what color is the triangle ?", "attribute"),
        ("what shape is the blue object ?", "attribute"),
        ("where is the black cross relative to the purple triangle ?", "spatial"),
        ("is there a yellow cross in the image ?", "existence"),
        ("what color are most of the objects ?", "general"),
        ("which half of the image has the most objects ?", "general"),
    ],
)
def test_synthetic_templates_exact(question, label):
    assert route(question) == label


LLAVA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
                "detailed, and polite answers to the human's questions.")
# Prompts as CLASP decodes them: special tokens skipped (Qwen's <|im_start|> leaves "user" on a line), visual
# tokens left out
TEMPLATES = {
    "llava-1.5": lambda text: f"{LLAVA_SYSTEM} USER: \n{text} ASSISTANT:",
    "qwen2-vl": lambda text: f"system\nYou are a helpful assistant.\nuser\n{text}\nassistant\n",
    "none": lambda text: text,
}
# What the benchmark loaders put around a question (before it, after it)
FORMATS = [("", ""), ("", _SHORT_ANSWER), ("", _VIZWIZ_POST), ("", _OPTION_LETTER), ("", _MMBENCH_CN_POST),
           (_VIDEOMME_OPTIONS + "\n", _OPTION_LETTER), ("", " Please answer yes or no.")]


def spaced(text: str) -> str:
    """As a word-level tokenizer (the reference model's) decodes text: punctuation split off ("option ' s"), every
    space and newline one space."""
    return re.sub(r"\s+", " ", re.sub(r"([^\w\s])", r" \1 ", text)).strip()


@pytest.mark.parametrize("before, after", FORMATS)
@pytest.mark.parametrize("template, decode", [(name, str) for name in TEMPLATES] + [
    ("llava-1.5", spaced), ("none", spaced)])  # (Qwen's tokenizer keeps the newlines that mark its roles)
def test_a_benchmark_prompt_routes_as_its_bare_question(template, before, after, decode):
    """The answer-format instructions ("a single word", "the option's letter") and the chat template are not the
    question: routed with them, every question went to ocr."""
    for question, _ in TABLE:
        prompt = decode(TEMPLATES[template](before + question + after))
        assert instruction(prompt) == instruction(decode(question)), prompt
        assert route(instruction(prompt)) == route(decode(question))


def test_deterministic():
    first = [route(q) for q, _ in TABLE]
    assert [route(q) for q, _ in TABLE] == first
    assert [route(q) for q, _ in reversed(TABLE)] == first[::-1]


@pytest.mark.parametrize("question", ["", "   ", "?", "hello", "图", "a" * 500, "12345", "左" * 50])
def test_route_returns_a_class(question):
    assert route(question) in CLASSES


def test_route_table_returns_classes():
    assert all(route(q) in CLASSES for q, _ in TABLE)


def test_checked_passes_known_class():
    assert checked(lambda q: "count")("how many?") == "count"


def test_checked_rejects_unknown_class():
    with pytest.raises(ValueError, match="colour"):
        checked(lambda q: "colour")("what colour is it?")
