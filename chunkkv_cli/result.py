"""The result of answering one question, whatever produced it (`ask`, a .ckv, `batch`, `eval`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# Kept out of the JSON record (`as_dict`): long lists that callers read from the object when they need them.
DETAIL_FIELDS = ("token_ids", "kept_per_layer")


@dataclass
class Answer:
    """One answer: its text and tokens, what its cache kept, and where the time went.

    prompt_tokens counts the uncompressed prompt (document and question); kept_tokens is the mean of
    kept_per_layer. prefill_seconds is the whole prefill, or the question's append for an answer from a
    compressed prefix (then compress_seconds is 0: the prefix was compressed before).
    """

    text: str
    prompt_tokens: int
    kept_tokens: float
    full_kv_bytes: int
    kept_kv_bytes: int
    prefill_seconds: float
    compress_seconds: float
    decode_seconds: float
    new_tokens: int
    token_ids: list[int] = field(default_factory=list, repr=False)
    kept_per_layer: list[int] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        """Every field but the long lists (token ids, kept tokens per layer)."""
        return {k: v for k, v in asdict(self).items() if k not in DETAIL_FIELDS}

    def record(self) -> dict:
        """The JSON fields of `ask --json` and of a batch record, the same names everywhere: the text is `answer`."""
        values = self.as_dict()
        return {"answer": values.pop("text"), **values}
