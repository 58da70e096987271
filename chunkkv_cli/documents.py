"""Reading user documents and turning (document, question) into a chat prompt."""

from __future__ import annotations

import codecs
import json
import sys
from pathlib import Path

from chunkkv_cli.errors import ChunkKVError

INSTRUCTION = "Read the document below and answer the question that follows it. Answer briefly."


def read_document(path: str) -> str:
    """Text of a file, or of standard input for '-'; missing, empty and binary files are errors."""
    if path == "-":
        return _checked_text(sys.stdin.buffer.read(), "standard input")
    file = Path(path)
    if not file.exists():
        raise ChunkKVError(f"document not found: {path}")
    if file.is_dir():
        raise ChunkKVError(f"document is a directory, not a text file: {path}")
    try:
        data = file.read_bytes()
    except OSError as err:
        raise ChunkKVError(f"cannot read {path}: {err.strerror}") from err
    return _checked_text(data, path)


# Longest first: the UTF-32 LE mark starts with the UTF-16 LE one.
_BYTE_ORDER_MARKS = (
    (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"),
)  # fmt: skip


def _checked_text(data: bytes, name: str) -> str:
    encoding = next((enc for bom, enc in _BYTE_ORDER_MARKS if data.startswith(bom)), None)
    if encoding is None and b"\x00" in data[:65536]:
        raise ChunkKVError(f"{name} looks binary (it contains NUL bytes); give a text or markdown file")
    try:
        text = data.decode(encoding or "utf-8")
    except UnicodeDecodeError as err:
        what = f"{encoding.upper()} text, as its byte-order mark says" if encoding else "UTF-8 text"
        raise ChunkKVError(f"{name} is not {what} (bad byte at offset {err.start})") from err
    if not text.strip():
        raise ChunkKVError(f"{name} is empty")
    return text


def prompt_ids(tokenizer, document: str, question: str) -> list[int]:
    """Chat prompt with the document first and the question last, ready for the assistant's answer."""
    content = f"{INSTRUCTION}\n\n<document>\n{document.strip()}\n</document>\n\nQuestion: {question.strip()}"
    messages = [{"role": "user", "content": content}]
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(content + "\nAnswer:")["input_ids"]


def fit_to_context(tokenizer, document: str, question: str, limit: int, truncate: bool) -> list[int]:
    """Prompt ids within `limit` tokens: an error naming both numbers, or the document cut at its end."""
    build = lambda doc: prompt_ids(tokenizer, doc, question)  # noqa: E731
    return _fit(tokenizer, document, build, limit, truncate, "the prompt is {n} tokens")


def _fit(tokenizer, document: str, build, limit: int, truncate: bool, what: str) -> list[int]:
    """`build(document)` within `limit` tokens, cutting the document's end only when `truncate` allows it."""
    ids = build(document)
    if len(ids) <= limit:
        return ids
    if not truncate:
        raise ChunkKVError(
            f"{what.format(n=len(ids))} but the model's context leaves room for {limit}; "
            "use a shorter document or --truncate"
        )
    doc_ids = tokenizer(document, add_special_tokens=False)["input_ids"]
    keep = len(doc_ids) - (len(ids) - limit)
    while keep > 0:
        ids = build(tokenizer.decode(doc_ids[:keep]))
        if len(ids) <= limit:
            return ids
        keep -= len(ids) - limit  # decoding then re-encoding can merge tokens differently: cut again
    raise ChunkKVError(
        f"{what.format(n=len(build('')))} without any of the document, and the model's context leaves room for "
        f"{limit}: ask a shorter question or lower --max-new-tokens"
    )


# A saved cache holds the prompt up to the question: the prefix below. Placeholder questions find where it
# ends; the stand-in document gives the question's tokens without the real document (`ask doc.ckv` never reads it).
_PLACEHOLDER_QUESTIONS = ("A", "B")
_STAND_IN_DOCUMENT = "(document)"


def prefix_ids(tokenizer, document: str) -> list[int]:
    """The question-independent start of `prompt_ids`: chat header, instruction, document, closing tag, 'Question:'.

    `prefix_ids(t, d) + question_ids(t, q)` is the prompt `prompt_ids(t, d, q)` builds, whenever the tokenizer does
    not merge tokens across the 'Question:' boundary (BPE tokenizers with pre-tokenisation never do).
    """
    first, second = (prompt_ids(tokenizer, document, q) for q in _PLACEHOLDER_QUESTIONS)
    return first[: _common_length(first, second)]


def question_ids(tokenizer, question: str) -> list[int]:
    """The prompt's tokens after `prefix_ids`: the question, the end of the user turn and the assistant header."""
    if not question.strip():
        raise ChunkKVError("the question is empty")
    prefix = prefix_ids(tokenizer, _STAND_IN_DOCUMENT)
    full = prompt_ids(tokenizer, _STAND_IN_DOCUMENT, question)
    if full[: len(prefix)] != prefix:
        raise ChunkKVError(f"cannot split the prompt before the question {question.strip()!r} with this tokenizer")
    return full[len(prefix):]


def pass_request_ids(tokenizer, compressor) -> list[int]:
    """Token ids of the request a method's own pass appends after the prefix (as a question would be), or []."""
    request = getattr(compressor, "pass_request", None)
    if tokenizer is None or not request:
        return []
    return question_ids(tokenizer, request)


def _common_length(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def fit_prefix_to_context(tokenizer, document: str, limit: int, truncate: bool) -> list[int]:
    """`prefix_ids` within `limit` tokens: an error naming both numbers, or the document cut at its end."""
    build = lambda doc: prefix_ids(tokenizer, doc)  # noqa: E731
    what = "the document's prompt is {n} tokens (a question and its answer need the rest)"
    return _fit(tokenizer, document, build, limit, truncate, what)


def read_questions(path: str) -> list[str]:
    """Questions from a file: one per line, or JSONL objects with a `question` field (blank lines skipped)."""
    if path != "-" and not Path(path).is_file():
        raise ChunkKVError(f"questions file not found: {path}")
    lines = [(n, line.strip()) for n, line in enumerate(read_document(path).splitlines(), start=1) if line.strip()]
    if not lines[0][1].startswith("{"):
        return [line for _, line in lines]
    questions = []
    for line_no, line in lines:
        record = json_line(line, f"{path}:{line_no}")
        question = record.get("question") if isinstance(record, dict) else None
        if not isinstance(question, str) or not question.strip():
            raise ChunkKVError(f"{path}:{line_no}: expected a JSON object with a non-empty 'question' string")
        questions.append(question.strip())
    return questions


def json_line(line: str, where: str):
    """One line of a JSONL file, decoded; `where` (path:line) names it in the error."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise ChunkKVError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
