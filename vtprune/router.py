"""Instruction -> question class, for CLASP: rule-based keywords in English and Chinese, deterministic.

The class says what visual evidence a question needs: text (ocr), how many (count),
a property (attribute), a relation (spatial), whether something is there (existence),
or the scene (general). Rules are tried in a fixed order; the first that matches wins,
so questions that mention two things ("how many red cars are left of the bus?") go to
the more specific need (count before spatial, spatial before attribute).
"""

from __future__ import annotations

import re
from typing import Callable

CLASSES = ("ocr", "count", "attribute", "spatial", "existence", "general")

_RULES: list[tuple[str, list[str]]] = [
    ("ocr", [
        r"\b(read|written|writing|text|word|words|letters?|say|says|spell|title|label|sign|brand|logo|caption|"
        r"number (?:on|of the) (?:jersey|bus|plate|shirt)|license plate|phone number|price|date|time (?:shown|on))\b",
        r"\bwhat (?:does|do) (?:the|this|that) \w+ (?:say|read)\b",
        r"(文字|写着|写的|写了|读|标题|标签|招牌|单词|字母|品牌|车牌|价格|日期|上面写)",
    ]),
    ("count", [
        r"\bhow many\b", r"\bnumber of\b", r"\bcount\b", r"\bhow much (?:people|objects)\b",
        r"(多少|几个|几只|几辆|几人|几位|数量|数一数|有几)",
    ]),
    ("spatial", [
        r"\b(left|right|above|below|under|underneath|beneath|behind|in front of|next to|beside|between|near|nearest|"
        r"closest|farthest|top|bottom|corner|relative to|position|located|where)\b",
        r"(左边|右边|左侧|右侧|上方|下方|上面|下面|后面|前面|旁边|之间|附近|位置|哪里|在哪|角落)",
    ]),
    ("attribute", [
        r"\b(colou?r|shape|material|made of|size|shiny|texture|pattern|wearing|kind of|type of|style)\b",
        r"\bwhat (?:is|are) the \w+ made\b",
        r"(颜色|什么色|形状|材质|材料|大小|穿着|什么样|图案)",
    ]),
    ("existence", [
        r"^\s*(is|are) there\b", r"\b(is there|are there|does (?:the|this) (?:image|picture|photo) (?:contain|show|have))\b",
        r"\b(exist|exists|present|visible|any)\b",
        r"(有没有|是否有|是否存在|存在|有.*吗)",
    ]),
]
_COMPILED = [(name, [re.compile(p, re.IGNORECASE) for p in patterns]) for name, patterns in _RULES]


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
