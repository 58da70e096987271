"""Stand-in for `datasets` so kvpress imports offline; only presses unused by the benchmark call it."""


def load_dataset(*args, **kwargs):
    raise RuntimeError("datasets is not installed: this press is not available in the benchmark environment")
