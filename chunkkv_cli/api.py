"""The Python API behind `import chunkkv`: load a model, compress a document, ask, save and load `.ckv` caches.

The commands `ask` and `compress` are clients of this module; `chunkkv/__init__.py` re-exports its public names.
Nothing here imports torch at module level, so `import chunkkv` is quick; the first model load pays for it.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Union

from chunkkv_cli import registry
from chunkkv_cli.errors import ChunkKVError
from chunkkv_cli.options import DEFAULT_MODEL, Compression, Generation, ModelSpec
from chunkkv_cli.result import Answer

# Tokens of the context a compressed document leaves for a question and its answer (`Model.compress`).
QUESTION_ROOM = 256

Document = Union[str, os.PathLike]


@dataclass
class Hooks:
    """What a long call reports as it runs; every callback is optional (the CLI draws its progress bars with it).

    Parameters
    ----------
    on_stage : callable(description, total), optional
        A new stage starts ("tokenising", "prefill + kvzip"); `total` is its number of steps (layers) or None.
    on_layer : callable(layer_index), optional
        One decoder layer of the prefill is done.
    on_text : callable(piece), optional
        A piece of the answer, as it is decoded (streaming).
    on_warning : callable(message), optional
        A warning about the run (a budget below the observation window); default `warnings.warn`.
    """

    on_stage: Callable[[str, int | None], None] | None = None
    on_layer: Callable[[int], None] | None = None
    on_text: Callable[[str], None] | None = None
    on_warning: Callable[[str], None] | None = None

    def stage(self, description: str, total: int | None = None) -> None:
        if self.on_stage is not None:
            self.on_stage(description, total)

    def warn(self, message: str | None) -> None:
        if not message:
            return
        if self.on_warning is not None:
            self.on_warning(message)
        else:
            warnings.warn(message, stacklevel=3)


def _budget_warning(hooks: Hooks, compressor, n_tokens: int) -> None:
    from chunkkv_cli.commands.options import small_budget_warning

    hooks.warn(small_budget_warning(compressor, n_tokens))


def _text_of(document: Document) -> str:
    """A str is the document's text; a path (`pathlib.Path`) is read (UTF-8, checked for being empty or binary)."""
    if isinstance(document, os.PathLike):
        from chunkkv_cli.documents import read_document

        return read_document(os.fspath(document))
    if not isinstance(document, str) or not document.strip():
        raise ChunkKVError("the document is empty; give its text (a str) or a pathlib.Path to read")
    return document


class CompressedCache:
    """A document's KV cache compressed without its questions: ask it many questions, save it to a `.ckv` file.

    Made by `Model.compress` or `CompressedCache.load`; `meta` records the model, method and document it came from.
    """

    def __init__(self, prefix, meta: dict, path: Path | None = None):
        self.prefix, self.meta, self.path = prefix, meta, path  # path: the file it was loaded from, if any

    @classmethod
    def load(cls, path: str | os.PathLike) -> CompressedCache:
        """Read a `.ckv` file (CPU tensors), checked for damage and format version; nothing in it is executed."""
        from chunkkv_cli.cache_io import read

        meta, prefix = read(path)
        return cls(prefix, meta, Path(path))

    def save(self, path: str | os.PathLike) -> int:
        """Write the cache to `path` (ending in .ckv) atomically; returns the file's size in bytes."""
        from chunkkv_cli.cache_io import SUFFIX, save
        from chunkkv_cli.outputs import check_output_file

        path = Path(path)
        if path.suffix != SUFFIX:
            raise ChunkKVError(f"a cache file must end in {SUFFIX} (ask recognises caches by it), got {path}")
        check_output_file(path, "the cache file")
        return save(path, self.prefix, self.meta)

    @property
    def method(self) -> str:
        return self.meta["method"]["name"]

    @property
    def prompt_tokens(self) -> int:
        """Tokens of the uncompressed prompt prefix (everything before the question)."""
        return self.prefix.prefix_len

    @property
    def kept_tokens(self) -> float:
        """Tokens kept per layer, on average."""
        kept = self.prefix.kept_lengths()
        return sum(kept) / len(kept)

    @property
    def kept_kv_bytes(self) -> int:
        return self.prefix.kept_bytes()

    @property
    def full_kv_bytes(self) -> int:
        """What the uncompressed prefix's KV cache would take."""
        return self.prefix.full_bytes

    def __repr__(self) -> str:
        return f"CompressedCache({self.method}, {self.kept_tokens:.0f} of {self.prompt_tokens} tokens kept per layer)"


class Model:
    """A loaded model and tokenizer with chunkkv's compressing attention installed (`chunkkv.load` makes one)."""

    def __init__(self, loaded, spec: ModelSpec):
        self.loaded, self.spec = loaded, spec
        self._identity: dict | None = None

    @property
    def name(self) -> str:
        """The profile's name (e.g. smollm2-135m)."""
        return self.loaded.profile.name

    @property
    def max_context(self) -> int:
        return self.loaded.profile.max_context

    def identity(self) -> dict:
        """What a `.ckv` must share with this model: config, weights and tokenizer hashes (computed once)."""
        if self._identity is None:
            from chunkkv_cli.cache_io import model_identity

            self._identity = model_identity(self.loaded, self.spec.model)
        return self._identity

    def compress(
        self, document: Document, compression: Compression | None = None, truncate: bool = False,
        room: int = QUESTION_ROOM, hooks: Hooks | None = None, source: str | None = None,
    ) -> CompressedCache:  # fmt: skip
        """Prefill the document without a question and compress its KV cache (kvzip at ratio 0.1 by default).

        `room`: tokens of the context left for a question and its answer; `truncate` cuts the document to fit
        instead of failing. `source` names the document in the cache's metadata (default: its file name or "text").
        """
        from chunkkv_cli.cache_io import make_meta, method_meta

        compression = compression or Compression(registry.QUESTION_AGNOSTIC_DEFAULT)
        compressor = compression.compressor()
        require_reusable(compressor)
        text, hooks = _text_of(document), hooks or Hooks()
        prefix = self._compress_prefix(text, compression, compressor, self.max_context - room, truncate, hooks)
        source = source or (Path(document).name if isinstance(document, os.PathLike) else "text")
        meta = make_meta(self.identity(), method_meta(compressor, compression.reuse_layers), text, prefix, source)
        return CompressedCache(prefix, meta)

    def _compress_prefix(self, text: str, compression: Compression, compressor, limit: int, truncate: bool, hooks):
        from chunkkv_cli.documents import fit_prefix_to_context
        from chunkkv_cli.reuse import compress_prefix

        hooks.stage("tokenising")
        ids = fit_prefix_to_context(self.loaded.tokenizer, text, limit, truncate)
        _budget_warning(hooks, compressor, len(ids))
        hooks.stage(f"prefill + {compressor.name}", self.loaded.model.config.num_hidden_layers)
        return compress_prefix(self.loaded.model, ids, compressor, compression.reuse_layers, hooks.on_layer,
                               self.loaded.tokenizer)  # fmt: skip

    def ask(
        self, document: Document | CompressedCache, question: str, compression: Compression | None = None,
        generation: Generation | None = None, truncate: bool = False, hooks: Hooks | None = None,
    ) -> Answer:  # fmt: skip
        """Answer `question` about a document (its text, a `pathlib.Path`) or a `CompressedCache`.

        With a document the whole prompt is prefilled and its question scores the document (chunkkv at ratio 0.1
        by default). With a cache, the question is appended to a copy of it; a `compression` with a ratio or budget
        then re-selects the stored tokens with the question as its window (narrowing).
        """
        if isinstance(document, CompressedCache):
            narrow = compression.compressor() if compression is not None else None
            return next(self.answers(document, [question], generation, hooks, narrow))
        return self._ask_text(_text_of(document), question, compression, generation or Generation(), truncate,
                              hooks or Hooks())  # fmt: skip

    def _ask_text(self, text: str, question: str, compression, generation: Generation, truncate: bool, hooks):
        from chunkkv_cli.documents import fit_to_context
        from chunkkv_cli.pipeline import answer

        _check_question(question)
        compression = compression or Compression(registry.DEFAULT)
        compressor = compression.compressor()
        hooks.stage("tokenising")
        limit = self.max_context - generation.max_new_tokens
        ids = fit_to_context(self.loaded.tokenizer, text, question, limit, truncate)
        _budget_warning(hooks, compressor, len(ids))
        hooks.stage(f"prefill + {compressor.name}", self.loaded.model.config.num_hidden_layers)
        return answer(
            self.loaded.model, self.loaded.tokenizer, ids, compressor, reuse_layers=compression.reuse_layers,
            on_text=hooks.on_text, on_layer=hooks.on_layer, **generation.kwargs(),
        )  # fmt: skip

    def answers(
        self, cache: CompressedCache, questions: list[str], generation: Generation | None = None,
        hooks: Hooks | None = None, narrow=None,
    ) -> Iterator[Answer]:  # fmt: skip
        """Answer each question from its own copy of `cache`, in order; all are checked to fit before the first.

        `narrow`: a method object (`Compression(...).compressor()`) that re-selects the stored tokens per question.
        """
        from chunkkv_cli.reuse import answer_question

        generation, hooks = generation or Generation(), hooks or Hooks()
        suffixes = self._question_ids(cache, questions, generation.max_new_tokens)
        loaded = self.loaded
        for ids in suffixes:
            yield answer_question(loaded.model, loaded.tokenizer, cache.prefix, ids, on_text=hooks.on_text,
                                  **generation.kwargs(), narrow=narrow)  # fmt: skip

    def _question_ids(self, cache: CompressedCache, questions: list[str], max_new_tokens: int) -> list[list[int]]:
        """The questions' tokens, once the cache is known to suit this model and each question to fit after it."""
        from chunkkv_cli.cache_io import check_model, check_shapes
        from chunkkv_cli.documents import question_ids

        where = cache.path or "the cache"
        check_model(cache.meta, self.identity(), where)
        check_shapes(cache.prefix, self.loaded.model.config, where)
        for question in questions:
            _check_question(question)
        suffixes = [question_ids(self.loaded.tokenizer, q) for q in questions]
        longest = max(map(len, suffixes), default=0)
        if cache.prompt_tokens + longest + max_new_tokens > self.max_context:
            raise ChunkKVError(
                f"{where} holds {cache.prompt_tokens} prompt tokens; with a {longest}-token question and "
                f"max_new_tokens {max_new_tokens} that exceeds the model's {self.max_context}-token context: "
                "ask a shorter question or lower max_new_tokens"
            )
        return suffixes

    def __repr__(self) -> str:
        return f"Model({self.name}, {self.loaded.device})"


def _check_question(question: str) -> None:
    if not isinstance(question, str) or not question.strip():
        raise ChunkKVError("the question is empty; give the question to answer")


def require_reusable(compressor, where: str = "compress") -> None:
    """Compress-once paths need a method whose compressed document serves later questions."""
    if not compressor.caps.reusable:
        reusable = ", ".join(methods(reusable=True))
        raise ChunkKVError(f"{where} needs a method that compresses a document once for later questions "
                           f"({reusable}); {compressor.name} selects at every decode step")  # fmt: skip


def load(model: str | ModelSpec = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto") -> Model:
    """Load a model: a profile name (`chunkkv profiles`), a profile .yaml, a local Hugging Face folder or a .gguf.

    A `ModelSpec` gives every loading option at once (and overrides `device` and `dtype`); nothing is downloaded.
    """
    spec = model if isinstance(model, ModelSpec) else ModelSpec(model, device, dtype)
    return Model(spec.load(), spec)


def methods(**capabilities: bool) -> list[str]:
    """The registered method names, e.g. ``methods()``, or those with given capabilities: ``methods(reusable=True)``."""
    if not capabilities:
        return registry.names()
    from chunkkv_cli.compress import methods_where

    return methods_where(**capabilities)


def method(name: str):
    """The method's class (a `Compressor` subclass: its docstring, `caps` and parameters); imports torch."""
    from chunkkv_cli.compress import method_class

    return method_class(name)


def samples_dir() -> Path:
    """The folder of the bundled sample documents (package data in a wheel, `samples/` in a checkout)."""
    from chunkkv_cli.profiles import data_dir

    return data_dir("samples")


def sample(name: str = "lighthouse.md") -> Path:
    """The path of a bundled sample (lighthouse.md, questions.txt, jobs.jsonl, ...)."""
    path = samples_dir() / name
    if not path.is_file():
        found = ", ".join(sorted(p.name for p in samples_dir().glob("*") if p.is_file()))
        raise ChunkKVError(f"no bundled sample {name!r}; there are: {found}")
    return path
