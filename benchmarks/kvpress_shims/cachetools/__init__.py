"""Stand-in for `cachetools` so kvpress imports offline: `cached` leaves the function uncached."""


class LRUCache(dict):
    def __init__(self, maxsize=None, **kwargs):
        super().__init__()


def cached(cache=None, **kwargs):
    return lambda fn: fn
