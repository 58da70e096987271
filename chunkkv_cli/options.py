"""The options of a run, built once at the edge (a command, or a script) and passed whole to the code that reads them.

Each group is a frozen dataclass that checks its values when built, so a bad flag fails with one line before
a model loads. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from chunkkv_cli import registry
from chunkkv_cli.errors import ChunkKVError
from chunkkv_cli.memory import check_ratio_budget

DEFAULT_MODEL = "smollm2-135m"
DECODERS = ("auto", "hf", "fast", "compiled")
PREFILL_BLOCK_ATTR = "chunkkv_prefill_block"  # set on a loaded model by `ModelSpec.configure`


def param_pair(pair: str) -> tuple[str, str]:
    """``KEY=VALUE`` as (key, value), both stripped; anything else fails in one line."""
    key, sep, value = pair.partition("=")
    if not sep or not key.strip():
        raise ChunkKVError(f"--param takes KEY=VALUE (e.g. reach=1024), got {pair!r}")
    return key.strip(), value.strip()


@dataclass(frozen=True)
class Compression:
    """How a document's KV cache is compressed.

    Parameters
    ----------
    method : str, default "chunkkv"
        A registered method (`chunkkv methods`).
    ratio : float, optional
        Fraction of the prompt's tokens kept per layer, in (0, 1]; 0.1 unless ``budget`` is given.
    budget : int, optional
        Tokens kept per layer, window included. Overrides ``ratio``.
    window : int, default 32
        The last ``window`` prompt tokens are kept, and score the rest.
    chunk_size : int, optional
        Tokens per chunk kept or dropped together; None leaves each method its own default (chunkkv 10,
        kvzip 1). Methods without chunks ignore it.
    reuse_layers : int, default 1
        Layers per group sharing one selection (1 = no index reuse).
    offload : str, optional
        ``"cpu"``: methods that recall tokens at decode time keep the clustered K/V in host memory.
    params : tuple of str
        The method's own parameters as ``KEY=VALUE`` (``--param``; `chunkkv methods` lists them).
    """

    method: str = "chunkkv"
    ratio: float | None = None
    budget: int | None = None
    window: int = 32
    chunk_size: int | None = None
    reuse_layers: int = 1
    offload: str | None = None
    params: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", tuple(self.params))
        for pair in self.params:
            param_pair(pair)
        if self.method not in registry.REGISTRY:
            raise ChunkKVError(f"unknown method {self.method!r}; choose one of: {', '.join(registry.names())}")
        check_ratio_budget(self.ratio, self.budget)
        if self.window < 1:
            raise ChunkKVError(f"--window must be at least 1, got {self.window}")
        if self.reuse_layers < 1:
            raise ChunkKVError("--reuse-layers must be at least 1")

    def compressor(self, method: str | None = None):
        """The method object (imports torch), taking the options it has parameters for.

        `method` builds another method at the same settings (bench and eval compare methods side by side);
        ``--offload`` is then passed only to methods that take it.
        """
        from chunkkv_cli.compress import compressor_for, method_class, typed_params

        if method is None and self.offload is not None and "offload" not in method_class(self.method).parameters():
            raise ChunkKVError(
                f"--offload is for methods that recall tokens at decode time (clusterkv), not {self.method}"
            )
        own = typed_params(self.method, self.params) if method in (None, self.method) else {}
        shared = {"ratio": self.ratio, "budget": self.budget, "window": self.window, "chunk_size": self.chunk_size,
                  "offload": self.offload}  # fmt: skip
        return compressor_for(method or self.method, **{**shared, **own})

    def settings(self) -> dict:
        """The compression settings as a report lists them (offload only when set)."""
        shared = {"ratio": self.ratio, "budget": self.budget, "window": self.window, "chunk_size": self.chunk_size}
        shared = shared if self.offload is None else {**shared, "offload": self.offload}
        return {**shared, "params": dict(map(param_pair, self.params))} if self.params else shared


@dataclass(frozen=True)
class Generation:
    """How an answer is decoded: at most ``max_new_tokens``, greedy at temperature 0, by ``decoder``."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    decoder: str = "auto"

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ChunkKVError("--max-new-tokens must be at least 1")
        if self.decoder not in DECODERS:
            raise ChunkKVError(f"--decoder must be one of {', '.join(DECODERS)}, got {self.decoder!r}")
        # NaN fails both comparisons, so it is refused too.
        if not (0 <= self.temperature < float("inf")):
            raise ChunkKVError(f"--temperature must be 0 (greedy) or a positive number, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ChunkKVError(f"--top-p must be in (0, 1], got {self.top_p}")

    def kwargs(self) -> dict:
        """The keyword arguments of `pipeline.answer` and `reuse.answer_question`."""
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "decoder": self.decoder}  # fmt: skip


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load and where: a profile name, profile .yaml, Hugging Face folder or .gguf file."""

    model: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    prefill_block: int | None = None  # tokens per prefill block; None: chosen from free GPU memory

    def __post_init__(self) -> None:
        if self.prefill_block is not None and self.prefill_block < 1:
            raise ChunkKVError(f"--prefill-block must be a positive number of tokens, got {self.prefill_block}")

    def configure(self, model) -> None:
        """Settings the model carries into every prefill (`generate.prefill` reads them)."""
        if self.prefill_block is not None:
            setattr(model, PREFILL_BLOCK_ATTR, self.prefill_block)

    def load(self, device: str | None = None):
        """The model and tokenizer (`model.Loaded`), on `device` if given (a rank's GPU), else ``self.device``."""
        from chunkkv_cli.model import load_model

        dtype = None if self.dtype == "auto" else self.dtype
        loaded = load_model(self.model, device or self.device, dtype, trust_remote_code=self.trust_remote_code)
        if loaded.tokenizer is None:
            raise ChunkKVError(f"{self.model} has no weights or tokenizer to answer with; use a model with weights")
        self.configure(loaded.model)
        return loaded
