"""Stand-in for `fire` so kvpress imports offline (only its stats-collection script uses it)."""


def Fire(*args, **kwargs):
    raise RuntimeError("fire is not installed in the benchmark environment")
