"""The model behind `chunkkv batch`: each document compressed once, every question answered from its own copy.

Jobs arrive in run order (`jobs.run_order`), so the jobs of one document with one compression are
consecutive: the runner keeps that document's compressed prefix (`reuse.compress_prefix`) until a job needs
another, and answers each question with `reuse.answer_question`. A document that cannot be compressed (missing,
too long, out of memory) fails each of its jobs with the same error without being tried again.
`question_aware` prefills each job's whole prompt instead (`pipeline.answer`): the question then scores the
document, at the price of one prefill per job. It is also the only mode for a model spread over several
devices: `reuse.cache_copy` puts every layer of a prefix copy on the first parameter's device.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Callable

from chunkkv_cli.batch import RunnerError, Settings
from chunkkv_cli.errors import ChunkKVError
from chunkkv_cli.jobs import Job, document_key


class ModelRunner:
    """`runner(job, settings) -> dict` for `batch.run_batch`, loading the model on its first job."""

    def __init__(self, load: Callable[[], object], jobs: list[Job], settings: Settings):
        self._load, self._loaded = load, None
        self._jobs, self._settings = jobs, settings
        self._key, self._prefix = None, None  # the prefix held: a CompressedPrefix, or the error it raised
        self._longest: dict | None = None

    def loaded(self):
        if self._loaded is None:
            try:
                loaded = self._load()
            except ChunkKVError as err:
                raise RunnerError(str(err), err.exit_code) from err
            self._loaded = loaded
        return self._loaded

    def __call__(self, job: Job, settings: Settings) -> dict:
        loaded = self.loaded()
        if settings.question_aware:
            return self._whole_prompt(loaded, job, settings)
        return self._from_prefix(loaded, job, settings)

    def _from_prefix(self, loaded, job: Job, settings: Settings) -> dict:
        from chunkkv_cli.documents import question_ids
        from chunkkv_cli.reuse import answer_question

        question = question_ids(loaded.tokenizer, job.question)
        prefix, compressed_now = self._prefix_for(loaded, job, settings)
        needed = prefix.prefix_len + len(question) + settings.max_new_tokens
        if needed > loaded.profile.max_context:
            raise ChunkKVError(
                f"the document's {prefix.prefix_len} prompt tokens, this {len(question)}-token question and "
                f"--max-new-tokens {settings.max_new_tokens} exceed the model's {loaded.profile.max_context}-token context"
            )
        result = answer_question(loaded.model, loaded.tokenizer, prefix, question, **settings.generation().kwargs())
        return fields(result, len(question) + (prefix.prefix_len if compressed_now else 0))

    def _prefix_for(self, loaded, job: Job, settings: Settings):
        """(the compressed prefix of the job's document, whether it was compressed for this job)."""
        key = self._key_of(job, settings)
        if key == self._key:
            if isinstance(self._prefix, ChunkKVError):
                raise ChunkKVError(str(self._prefix), self._prefix.exit_code)
            return self._prefix, False
        self._release()
        failure = None
        try:
            prefix = self._compress(loaded, job, settings, key)
        except ChunkKVError as err:  # kept without its traceback, whose frames would hold the tensors
            failure = ChunkKVError(str(err), err.exit_code)
        if failure is not None:
            self._release(failed=True)
            self._key, self._prefix = key, failure
            raise ChunkKVError(str(failure), failure.exit_code)
        self._key, self._prefix = key, prefix
        return prefix, True

    def _compress(self, loaded, job: Job, settings: Settings, key):
        from chunkkv_cli.documents import fit_prefix_to_context
        from chunkkv_cli.reuse import compress_prefix

        text = read_text(job.path)
        compression = settings.compression()
        limit = loaded.profile.max_context - settings.max_new_tokens - self._longest_question(loaded, key)
        ids = fit_prefix_to_context(loaded.tokenizer, text, limit, settings.truncate)
        try:
            return compress_prefix(loaded.model, ids, compression.compressor(), compression.reuse_layers,
                                   tokenizer=loaded.tokenizer)  # fmt: skip
        except RuntimeError as err:
            if "out of memory" not in str(err).lower():
                raise
            raise ChunkKVError(
                f"out of memory compressing {job.document} ({len(ids)} tokens): try a lower --ratio/--budget"
            ) from err

    def _key_of(self, job: Job, settings: Settings) -> tuple:
        return (document_key(job), settings.prefix_key(), settings.max_new_tokens)

    def _longest_question(self, loaded, key) -> int:
        """Tokens of the longest question among the jobs that share this prefix: the room the prefix leaves."""
        from chunkkv_cli.documents import question_ids

        if self._longest is None:
            self._longest = {}
            for job in self._jobs:
                try:
                    n_tokens = len(question_ids(loaded.tokenizer, job.question))
                except ChunkKVError:
                    continue  # that job fails on its own
                job_key = self._key_of(job, self._settings.for_job(job))
                self._longest[job_key] = max(self._longest.get(job_key, 0), n_tokens)
        return self._longest.get(key, 0)

    def _whole_prompt(self, loaded, job: Job, settings: Settings) -> dict:
        from chunkkv_cli.documents import fit_to_context
        from chunkkv_cli.pipeline import answer

        text = read_text(job.path)
        compression = settings.compression()
        limit = loaded.profile.max_context - settings.max_new_tokens
        ids = fit_to_context(loaded.tokenizer, text, job.question, limit, settings.truncate)
        result = answer(
            loaded.model, loaded.tokenizer, ids, compression.compressor(), reuse_layers=compression.reuse_layers,
            **settings.generation().kwargs(),
        )
        return fields(result, len(ids))

    def _release(self, failed: bool = False) -> None:
        """Drop the prefix held before compressing the next document; after a failure (out of memory, say)
        also collect what the failed attempt left and hand the GPU's cached blocks back."""
        self._key, self._prefix = None, None
        if not failed:
            return
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def read_text(path: Path) -> str:
    from chunkkv_cli.documents import read_document

    if path.suffix == ".ckv":
        raise ChunkKVError(f"{path} is a saved cache; a batch job names the text document (`chunkkv ask` reads .ckv)")
    return read_document(str(path))


def fields(result, prefill_tokens: int) -> dict:
    """An `Answer` as the fields of a batch record."""
    return {**result.record(), "prefill_tokens": prefill_tokens}
