"""Evaluation data: JSONL readers (LongBench, question/answers, GSM8K), seeded generators, needle documents."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from chunkkv_cli.documents import json_line
from chunkkv_cli.errors import ChunkKVError
from chunkkv_cli.eval.scoring import gsm8k_number

DEFAULT_NEEDLE = "The secret code for the blue lighthouse is 7294."
DEFAULT_NEEDLE_QUESTION = "What is the secret code for the blue lighthouse?"
DEFAULT_NEEDLE_ANSWER = "7294"


@dataclass
class Sample:
    """One prompt of a task: its token ids, what a right answer looks like, and where it sits in the grid."""

    id: str
    prompt: list[int]
    reference: dict = field(default_factory=dict)  # {"value": ...}, {"answers": [...]} or {"number": ...}
    meta: dict = field(default_factory=dict)  # e.g. needle length and depth, number of shots
    split: int | None = None  # where the question starts in `prompt` (question-agnostic runs compress before it)


def question_start(tokenizer, prompt: list[int], question: str) -> int:
    """Where `question` starts in a prompt built by `documents.prompt_ids` (its tokens end the prompt)."""
    from chunkkv_cli.documents import question_ids

    return len(prompt) - len(question_ids(tokenizer, question))


@dataclass
class QA:
    """One long-context question: a document, a question about it, acceptable answers."""

    id: str
    context: str
    question: str
    answers: list[str]
    length: int | None = None  # LongBench's own length field, when present


@dataclass
class Problem:
    """One math word problem with its worked solution ending in '#### N' and that final number."""

    question: str
    solution: str
    number: str


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line; a line that is not a JSON object is an error naming it."""
    file = Path(path)
    if not file.is_file():
        raise ChunkKVError(f"--data file not found: {path}")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ChunkKVError(f"{path} is not UTF-8 text (bad byte at offset {err.start})") from None
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        record = json_line(line, f"{path}:{line_no}")
        if not isinstance(record, dict):
            raise ChunkKVError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
        yield line_no, record


def read_longqa(path: str | Path) -> list[QA]:
    """LongBench layout (context, input, answers, optional length) or (context, question, answers)."""
    samples = [_longqa_record(record, f"{path}:{line_no}") for line_no, record in read_jsonl(path)]
    if not samples:
        raise ChunkKVError(f"{path} holds no samples")
    return samples


def _longqa_record(record: dict, where: str) -> QA:
    question_field = "input" if "input" in record else "question"
    missing = [name for name in ("context", question_field, "answers") if name not in record]
    if missing:
        raise ChunkKVError(
            f"{where}: missing {', '.join(missing)}; expected LongBench fields (context, input, answers) "
            "or (context, question, answers)"
        )
    context, question = record["context"], record[question_field]
    if not isinstance(context, str) or not isinstance(question, str):
        raise ChunkKVError(f"{where}: context and {question_field} must be strings")
    answers = _answer_list(record["answers"], where)
    sample_id = str(record.get("_id") or record.get("id") or where.rsplit(":", 1)[-1])
    length = record.get("length")
    return QA(sample_id, context, question, answers, length if isinstance(length, int) else None)


def _answer_list(answers, where: str) -> list[str]:
    if isinstance(answers, (str, int, float)):
        answers = [answers]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, (str, int, float)) for a in answers):
        raise ChunkKVError(f"{where}: answers must be a non-empty list of strings")
    return [str(a) for a in answers]


def read_gsm8k(path: str | Path) -> list[Problem]:
    """GSM8K layout: question, answer (a worked solution ending in '#### N')."""
    problems = []
    for line_no, record in read_jsonl(path):
        where = f"{path}:{line_no}"
        question, solution = record.get("question"), record.get("answer")
        if not isinstance(question, str) or not isinstance(solution, str):
            raise ChunkKVError(f"{where}: expected GSM8K fields question and answer (strings)")
        number = gsm8k_number(solution)
        if number is None:
            raise ChunkKVError(f"{where}: answer does not end in '#### N' with a number")
        problems.append(Problem(question.strip(), solution.strip(), number))
    if not problems:
        raise ChunkKVError(f"{path} holds no problems")
    return problems


_NAMES = ["Ada", "Bram", "Cleo", "Dmitri", "Esme", "Farid", "Greta", "Hugo", "Iris", "Jonah", "Kaya", "Lionel"]
_ITEMS = ["apples", "marbles", "stamps", "pencils", "shells", "coins", "stickers", "books", "cards", "beads"]


def arithmetic_problems(count: int, seed: int = 0) -> list[Problem]:
    """Seeded two-step word problems (buy, give away, share) with GSM8K-style worked solutions."""
    rng = random.Random(seed)
    return [_arithmetic_problem(rng) for _ in range(count)]


def _arithmetic_problem(rng: random.Random) -> Problem:
    name, friend = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    start, bought = rng.randint(5, 60), rng.randint(2, 9)
    packs = rng.randint(2, 6)
    given = rng.randint(1, start + bought * packs - 1)
    total = start + bought * packs
    left = total - given
    question = (
        f"{name} has {start} {item}. {name} buys {packs} packs with {bought} {item} in each pack, "
        f"then gives {given} {item} to {friend}. How many {item} does {name} have now?"
    )
    solution = (
        f"{name} buys {packs} * {bought} = {bought * packs} {item}, so has {start} + {bought * packs} = {total}. "
        f"After giving {given} away, {total} - {given} = {left}.\n#### {left}"
    )
    return Problem(question, solution, str(left))


_ADJECTIVES = ["quiet", "old", "narrow", "distant", "patient", "curious", "weathered", "bright", "heavy", "gentle"]
_NOUNS = [
    "village", "river", "keeper", "harbour", "orchard", "schoolteacher", "ferry", "market", "valley", "baker",
    "mill", "library", "shepherd", "garden", "bridge", "tailor", "meadow", "road", "carpenter", "island",
]  # fmt: skip
_VERBS = ["watched", "remembered", "crossed", "followed", "described", "repaired", "visited", "painted", "guarded"]
_TAILS = [
    "before the autumn rains", "as the tide turned", "without saying a word", "in the early morning",
    "while the bells rang", "long after supper", "under a grey sky", "for most of the year",
    "when the wind eased", "on the far side of the hill",
]  # fmt: skip


def haystack_text(sentences: int, seed: int = 0) -> str:
    """Deterministic filler prose without digits (so a needle's number is the only one), in paragraphs."""
    rng = random.Random(seed)
    lines = []
    for i in range(sentences):
        adjective, noun, verb, other = (
            rng.choice(_ADJECTIVES), rng.choice(_NOUNS), rng.choice(_VERBS), rng.choice(_NOUNS)
        )
        sentence = f"The {adjective} {noun} {verb} the {other} {rng.choice(_TAILS)}."
        lines.append(sentence + ("\n\n" if i % 6 == 5 else " "))
    return "".join(lines).strip()


def haystack_ids(tokenizer, n_tokens: int, text: str | None = None, seed: int = 0) -> list[int]:
    """At least `n_tokens` token ids of haystack: `text` repeated as needed, or generated prose."""
    source = text.strip() if text is not None else None
    sentences = max(16, n_tokens // 8)
    while True:
        body = _repeated(source, n_tokens) if source is not None else haystack_text(sentences, seed)
        ids = tokenizer(body, add_special_tokens=False)["input_ids"]
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
        if source is not None:
            source = source + "\n\n" + source
        sentences *= 2


def _repeated(text: str, n_tokens: int) -> str:
    copies = max(1, -(-n_tokens * 2 // max(1, len(text))))  # assume at least half a token per character
    return "\n\n".join([text] * min(copies, 64))


def insert_needle(tokenizer, haystack: list[int], length: int, depth: float, needle: str) -> str:
    """The first `length` haystack tokens as text, with `needle` placed `depth` of the way through.

    The position is counted in tokens, then moved back to the start of the sentence it falls in so
    the needle never splits a sentence (depth 0 puts it first, depth 1 last).
    """
    if not 0 <= depth <= 1:
        raise ChunkKVError(f"needle depth must be in [0, 1], got {depth}")
    text = tokenizer.decode(haystack[:length])
    cut = len(tokenizer.decode(haystack[: round(depth * length)])) if depth < 1 else len(text)
    cut = min(cut, len(text))
    if 0 < cut < len(text):
        boundary = max(text.rfind(". ", 0, cut), text.rfind("\n", 0, cut))
        cut = boundary + 1 if boundary >= 0 else 0
    before, after = text[:cut].rstrip(), text[cut:].lstrip()
    return " ".join(part for part in (before, needle.strip(), after) if part)


def depth_fractions(depths: int) -> list[float]:
    """`depths` evenly spaced needle depths from 0 (start) to 1 (end); a single depth is the middle."""
    if depths < 1:
        raise ChunkKVError(f"--depths must be at least 1, got {depths}")
    if depths == 1:
        return [0.5]
    return [round(i / (depths - 1), 4) for i in range(depths)]


# Samples for each task ---------------------------------------------------------------------------


def needle_samples(
    tokenizer,
    lengths: list[int],
    depths: list[float],
    needle: tuple[str, str, str],
    haystack: str | None = None,
    seed: int = 0,
    max_prompt: int | None = None,
) -> list[Sample]:
    """One sample per (length, depth): `length` haystack tokens with the needle at `depth`, then its question."""
    from chunkkv_cli.documents import prompt_ids

    text, question, value = needle
    hay = haystack_ids(tokenizer, max(lengths), haystack, seed)
    samples = []
    for length in lengths:
        for depth in depths:
            ids = prompt_ids(tokenizer, insert_needle(tokenizer, hay, length, depth, text), question)
            _check_fits(ids, max_prompt, f"--lengths {length}")
            meta = {"length": length, "depth": depth}
            split = question_start(tokenizer, ids, question)
            samples.append(Sample(f"L{length}-d{depth:g}", ids, {"value": value}, meta, split))
    return samples


def _check_fits(ids: list[int], max_prompt: int | None, what: str) -> None:
    if max_prompt is not None and len(ids) > max_prompt:
        raise ChunkKVError(
            f"{what} makes a {len(ids)}-token prompt but the model leaves room for {max_prompt}; use shorter lengths"
        )


def longqa_samples(tokenizer, items: list[QA], max_prompt: int) -> list[Sample]:
    """Prompts for (document, question) items; documents too long are cut in the middle, as LongBench does."""
    samples = []
    for item in items:
        ids, cut = middle_truncated_prompt(tokenizer, item.context, item.question, max_prompt)
        meta = {"truncated": cut} | ({"length": item.length} if item.length is not None else {})
        samples.append(Sample(item.id, ids, {"answers": item.answers}, meta, question_start(tokenizer, ids, item.question)))
    return samples


def middle_truncated_prompt(tokenizer, context: str, question: str, max_prompt: int) -> tuple[list[int], bool]:
    """Prompt ids within `max_prompt`, dropping the middle of the context if needed; (ids, whether cut)."""
    from chunkkv_cli.documents import prompt_ids

    ids = prompt_ids(tokenizer, context, question)
    if len(ids) <= max_prompt:
        return ids, False
    doc = tokenizer(context, add_special_tokens=False)["input_ids"]
    keep = len(doc) - (len(ids) - max_prompt)
    while keep > 0:
        half = keep // 2
        text = tokenizer.decode(doc[:half]) + "\n...\n" + tokenizer.decode(doc[len(doc) - (keep - half):])
        ids = prompt_ids(tokenizer, text, question)
        if len(ids) <= max_prompt:
            return ids, True
        keep -= max(8, len(ids) - max_prompt)
    raise ChunkKVError(f"the question alone does not fit in {max_prompt} tokens")


MANYSHOT_HINT = "Solve it like the worked examples and end with '#### <number>'."


def manyshot_samples(
    tokenizer, questions: list[Problem], pool: list[Problem], lengths: list[int], seed: int = 0
) -> list[Sample]:
    """For each question and length, as many worked examples from `pool` as fit in `length` tokens."""
    from chunkkv_cli.documents import prompt_ids

    rng = random.Random(seed)
    shots = [f"Question: {p.question}\nAnswer: {p.solution}" for p in pool]
    shot_tokens = [len(tokenizer(s, add_special_tokens=False)["input_ids"]) + 2 for s in shots]
    samples = []
    for q_index, problem in enumerate(questions):
        order = rng.sample(range(len(pool)), len(pool))
        order = [i for i in order if pool[i].question != problem.question]
        for length in lengths:
            chosen = _fill(order, shot_tokens, length)
            document = "\n\n".join(shots[i] for i in chosen)
            ids = prompt_ids(tokenizer, document, f"{problem.question}\n{MANYSHOT_HINT}")
            meta = {"length": length, "shots": len(chosen), "question": q_index}
            samples.append(Sample(f"q{q_index}-L{length}", ids, {"number": problem.number}, meta))
    return samples


def _fill(order: list[int], sizes: list[int], budget: int) -> list[int]:
    chosen, used = [], 0
    for i in order:
        if used + sizes[i] > budget:
            break
        chosen.append(i)
        used += sizes[i]
    return chosen
