"""Reading user documents and turning (document, question) into a chat prompt."""

from __future__ import annotations

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


def _checked_text(data: bytes, name: str) -> str:
    if b"\x00" in data[:65536]:
        raise ChunkKVError(f"{name} looks binary (it contains NUL bytes); give a text or markdown file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ChunkKVError(f"{name} is not UTF-8 text (bad byte at offset {err.start})") from err
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
    ids = prompt_ids(tokenizer, document, question)
    if len(ids) <= limit:
        return ids
    if not truncate:
        raise ChunkKVError(
            f"the prompt is {len(ids)} tokens but the model's context leaves room for {limit}; "
            "use a shorter document or --truncate"
        )
    doc_ids = tokenizer(document, add_special_tokens=False)["input_ids"]
    keep = max(0, len(doc_ids) - (len(ids) - limit))
    return prompt_ids(tokenizer, tokenizer.decode(doc_ids[:keep]), question)[:limit]
