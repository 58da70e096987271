"""chunkkv: offline long-document inference with a compressed KV cache."""

__version__ = "0.1.0"
