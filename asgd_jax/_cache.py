"""The one bounded compile cache: least-recently-used, thread-safe, keyed by hashable specs.

Programs built from a hashable description (a model, an optimizer, shapes) are compiled
once and reused by later runs with the same description; the cache keeps at most
``max_size`` of them so a long sweep does not hold every executable it ever built.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Hashable
from typing import Any

__all__ = ["CompileCache"]


class CompileCache:
    """A bounded LRU map from hashable keys to built (compiled) objects.

    ``get(key, build)`` returns the cached value for ``key`` or calls ``build()`` and keeps
    the result. Unhashable keys are built every time and never stored (a spec that holds an
    unhashable callable still works, it just does not share its program).
    """

    def __init__(self, max_size: int = 16):
        if max_size < 1:
            raise ValueError(f"`max_size` must be ≥ 1, got {max_size}.")
        self.max_size = max_size
        self._entries: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.builds = 0  # how many times `build` ran: a compile counter for tests.

    def get(self, key: Any, build: Callable[[], Any]) -> Any:
        try:
            hash(key)
        except TypeError:
            key = None
        if key is not None:
            with self._lock:
                if key in self._entries:
                    self._entries.move_to_end(key)
                    return self._entries[key]
        value = build()
        with self._lock:
            self.builds += 1
            if key is not None:
                self._entries[key] = value
                while len(self._entries) > self.max_size:
                    self._entries.popitem(last=False)
        return value

    def __contains__(self, key: Any) -> bool:
        try:
            with self._lock:
                return key in self._entries
        except TypeError:
            return False

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
