"""Answer scoring: normalisation, exact and substring match, token F1, final numbers."""

from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the SQuAD / LongBench normalisation)."""
    text = _ARTICLES.sub(" ", str(text).lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def exact_match(prediction: str, answers: list[str]) -> float:
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def substring_match(prediction: str, answers: list[str]) -> float:
    """1 when some normalised answer appears inside the normalised prediction (on word boundaries)."""
    pred = f" {normalize_answer(prediction)} "
    return float(any(normalize_answer(a) and f" {normalize_answer(a)} " in pred for a in answers))


def token_f1(prediction: str, answers: list[str]) -> float:
    """Best F1 over the answers of the bags of normalised words."""
    return max((_f1(normalize_answer(prediction).split(), normalize_answer(a).split()) for a in answers), default=0.0)


def _f1(pred: list[str], gold: list[str]) -> float:
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def contains_value(answer: str, value: str) -> float:
    """Needle score: the needle's value appears in the answer (normalised; digits ignore separators)."""
    target = normalize_answer(value)
    if target.replace(" ", "").isdigit():
        return float(target.replace(" ", "") in re.sub(r"(?<=\d)[,\s](?=\d)", "", normalize_answer(answer)))
    return substring_match(answer, [value])


def canonical_number(text: str) -> str | None:
    """'1,234.50' -> '1234.5', '-7.0' -> '-7'; None when `text` is not a number."""
    cleaned = text.replace(",", "").rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return str(int(value)) if value.is_integer() else repr(value)


def gsm8k_number(solution: str) -> str | None:
    """The number after the last '####' of a GSM8K solution."""
    if "####" not in solution:
        return None
    found = _NUMBER.findall(solution.rsplit("####", 1)[1])
    return canonical_number(found[0]) if found else None


def final_number(text: str) -> str | None:
    """The answer a model gave: the number after '####' if it wrote one, else the last number in the text."""
    marked = gsm8k_number(text)
    if marked is not None:
        return marked
    found = _NUMBER.findall(text)
    return canonical_number(found[-1]) if found else None


def number_match(prediction: str, number: str) -> float:
    return float(final_number(prediction) == canonical_number(number))
