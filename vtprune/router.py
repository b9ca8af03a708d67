"""Instruction -> question class, for CLASP: rule-based keywords in English and Chinese, deterministic.

The class says what visual evidence the ANSWER needs: text (ocr), how many (count),
a property (attribute), a relation (spatial), whether something is there (existence),
or the whole scene (general). Rules are tried in a fixed order; the first that matches
wins. A mixed question goes to what its answer is about, so:

- "how many cars are left of the bus?" -> count; "are there two dogs?" -> count
- "what color is the car left of the man?" -> attribute (the relation only picks the object)
- "is there a fence behind the horse?" -> spatial; "is there a red car?" -> existence
- "is the cat white?" -> attribute (checked after existence, so "is there a red car" stays existence)
- "what color are most of the objects?", "where was this photo taken?", artwork and
  "best describes the scene" questions -> general (checked before attribute and spatial).
"""

from __future__ import annotations

import re
from typing import Callable

CLASSES = ("ocr", "count", "attribute", "spatial", "existence", "general")

_NUMBER = r"(?:one|two|three|four|five|six|seven|eight|nine|ten|\d+)"
_ADJECTIVE = (  # a property word that ends a yes/no question: "is the bus red?", "big or small?"
    r"(?:red|orange|yellow|green|blue|purple|pink|brown|black|white|gr[ae]y|silver|gold(?:en)?|beige|"
    r"wooden|wood|metal(?:lic)?|plastic|glass|leather|stone|brick|ceramic|paper|"
    r"big|large|small|tiny|huge|tall|short|long|round|square|rectangular|striped|plaid|dotted|shiny|matte)"
)

_EXISTS_OPENER = r"\s*(?:(?:is|are) there|(?:do|can) you see|does (?:the|this) (?:image|picture|photo))\b"

_RULES: list[tuple[str, list[str]]] = [
    ("ocr", [
        r"\b(read|written|writing|printed|text|words?|letters?|says?|spell(?:ed)?|title|brand|logo|website|"
        r"url|web address|e-?mail|license plate|phone number|price|date|time (?:shown|on))\b",
        r"\bwhat (?:number|numbers|digits?) (?:is|are) (?:on|written|printed|shown|displayed)\b",
        r"\bnumber (?:on|of) the (?:jersey|bus|train|plate|shirt|door|building)\b",
        r"\bname of (?:the|this) (?:store|shop|restaurant|cafe|bar|hotel|company|business|street|team|"
        r"airline|book|magazine|newspaper|band|movie|film|product)\b",
        r"(文字|写着|写的|写了|读出|标题|标签上|单词|字母|品牌|车牌|价格|日期|网址|电话号码)",
    ]),
    ("count", [
        r"\bhow many\b", r"\bnumber of\b", r"\bcount\b", r"\bhow much (?:people|objects)\b",
        rf"^\s*(?:is|are) there (?:only |exactly |just |at least |at most |more than |fewer than )?{_NUMBER}\b",
        r"\b(?:is|are) there (?:more|fewer|less)\b",
        r"(多少|几个|几只|几辆|几人|几位|几张|几条|几本|数量|数一数|有几)",
        r"有(?:且只有)?[两三四五六七八九十\d]+\s*[个只辆位张条头本块台把件棵朵座]",
    ]),
    ("general", [  # whole-image questions whose wording would otherwise look attribute/spatial/existence
        r"\bmost (?:of )?(?:the )?(?:objects|shapes|items|things)\b",
        r"\bwhich (?:half|side|part|quadrant|region) of the (?:image|picture|photo) (?:has|have|contains?) "
        r"(?:the )?(?:most|more|fewest|fewer|least)\b",
        r"\b(?:where|when) (?:was|is|were) (?:this|the) (?:photo|picture|image|shot|video)\b",
        r"\b(?:photo|picture|image|shot) (?:was |is )?taken\b",
        r"\bartwork\b", r"\b(?:created|painted|drawn|directed) by\b",
        r"\bbest describes?\b(?! the (?:colou?r|shape|material|size|text|position|location|number))",
        r"\b(?:weather|season|mood|atmosphere|emotion)\b",
        r"(场景|天气|季节|心情|情绪|氛围|作者|画家|风格)",
    ]),
    ("attribute", [  # asking for a property, even of an object picked out by a relation
        r"\b(colou?rs?|shape|shaped|material|made (?:of|from)|texture|pattern|size)\b",
        rf"^(?!{_EXISTS_OPENER}).*\b(?:wearing|wears|wear|dressed in)\b",  # not "is there a man wearing a hat?"
        r"(颜色|什么色|形状|材质|材料|图案|大小|穿着什么|穿的什么|穿了什么|穿着.*衣服)",
    ]),
    ("spatial", [
        r"\b(left|right|above|below|under|underneath|beneath|behind|in front of|next to|beside|between|near|"
        r"nearest|closest|farthest|top|bottom|corner|relative to|position|located|location|where|which side)\b",
        r"(左边|右边|左侧|右侧|上方|下方|上面|下面|后面|前面|旁边|之间|附近|位置|哪里|在哪|角落)",
    ]),
    ("existence", [
        r"^\s*(?:is|are) there\b", r"\b(?:is|are) there (?:a|an|any|some)\b",
        r"\b(?:does|do) (?:the|this) (?:image|picture|photo) (?:contain|show|have|include)\b",
        r"\b(?:do|can) you see\b", r"\b(?:exists?|present|visible)\b",
        r"(有没有|是否有|是否存在|存在|有.*吗)",
    ]),
    ("attribute", [  # yes/no about a property: "is the cat white?", "which is larger?"
        rf"^\s*(?:is|are|was|were|does|do)\b.*\b{_ADJECTIVE}\s*(?:\?|$)",
        r"\b(?:bigger|smaller|larger|taller|shorter|longer|wider|heavier|older|younger)\b",
    ]),
]
_COMPILED = [(name, [re.compile(p, re.IGNORECASE) for p in patterns]) for name, patterns in _RULES]


# What a prompt holds besides its question: the chat template (a system prompt and role markers: "USER:",
# Qwen's "user" line once its special tokens are skipped) and the answer-format instructions benchmarks append
# (lmms-eval's post prompts, Video-MME's preamble), whose words ("a single word", "the option's letter") would
# route every question to ocr.
_USER_TURN = re.compile(r"\b(?:user|human)\s*:|^\s*user\s*$|\[INST\]", re.IGNORECASE | re.MULTILINE)
_ASSISTANT_TURN = re.compile(r"\b(?:assistant|gpt)\s*:|^\s*assistant\s*$|\[/INST\]", re.IGNORECASE | re.MULTILINE)
ANSWER_FORMATS = (
    "Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
    "When the provided information is insufficient, respond with 'Unanswerable'.",
    "Please answer yes or no.",
    "Select the best answer to the following multiple-choice question based on the video and the subtitles.",
    "Select the best answer to the following multiple-choice question based on the video.",
    "Respond with only the letter (A, B, C, or D) of the correct option.",
    "请直接使用所提供的选项字母作为答案回答。",
)
# word for word, whatever lies between the words: a tokenizer may decode "option's" as "option ' s"
_ANSWER_FORMAT = re.compile("|".join(r"\W*".join(re.findall(r"\w+", phrase)) + r"\W*" for phrase in ANSWER_FORMATS),
                            re.IGNORECASE)


def instruction(prompt: str) -> str:
    """The question a prompt's text asks: its last user turn, up to the assistant's turn, without the answer-format
    instructions benchmarks append. A bare question is returned as it is (stripped)."""
    users = list(_USER_TURN.finditer(prompt))
    text = prompt[users[-1].end():] if users else prompt
    if (assistant := _ASSISTANT_TURN.search(text)) is not None:
        text = text[:assistant.start()]
    return _ANSWER_FORMAT.sub(" ", text).strip()


def route(question: str) -> str:
    """The class of an instruction; 'general' when no rule matches."""
    for name, patterns in _COMPILED:
        if any(p.search(question) for p in patterns):
            return name
    return "general"


Router = Callable[[str], str]


def checked(router: Router) -> Router:
    """A user's router, wrapped so that a class outside CLASSES is an error rather than a silent default."""

    def call(question: str) -> str:
        found = router(question)
        if found not in CLASSES:
            raise ValueError(f"router returned {found!r} for {question!r}; classes are {', '.join(CLASSES)}")
        return found

    return call
