"""chunkkv: offline long-document inference with a compressed KV cache, from Python.

    import chunkkv

    model = chunkkv.load("smollm2-135m")                  # a profile, a .yaml, a Hugging Face folder or a .gguf
    answer = model.ask(chunkkv.sample(), "Who repaired the lens in 1911?")   # question-aware, chunkkv at 10 %
    print(answer.text, answer.kept_tokens, answer.prompt_tokens)

    cache = model.compress(chunkkv.sample(), chunkkv.Compression("kvzip", ratio=0.2))  # once, without questions
    cache.save("lighthouse.ckv")
    cache = chunkkv.CompressedCache.load("lighthouse.ckv")
    for answer in model.answers(cache, ["Who designed the tower?", "When was it lit?"]):
        print(answer.text)

Options come as one object each: `Compression` (method, ratio or budget, window, ...), `Generation`
(max_new_tokens, temperature, top_p, decoder) and `ModelSpec` (model, device, dtype). Bad input raises
`ChunkKVError` with a one-line message. `methods()` lists the registered compression methods, `method(name)`
gives one's class. The `chunkkv` command is built on this API (`chunkkv_cli` is the implementation).
"""

from chunkkv_cli import __version__
from chunkkv_cli.api import CompressedCache, Hooks, Model, load, method, methods, sample, samples_dir
from chunkkv_cli.errors import ChunkKVError
from chunkkv_cli.options import Compression, Generation, ModelSpec
from chunkkv_cli.result import Answer

__all__ = [
    "Answer",
    "ChunkKVError",
    "CompressedCache",
    "Compression",
    "Generation",
    "Hooks",
    "Model",
    "ModelSpec",
    "__version__",
    "load",
    "method",
    "methods",
    "sample",
    "samples_dir",
]
