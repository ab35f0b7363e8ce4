"""A small least-recently-used map for voice-clone prompts."""

import threading
from collections import OrderedDict
from typing import Generic, TypeVar

PromptKey = tuple[str, str | None]  # (reference audio digest, transcript or None)
T = TypeVar("T")


class PromptCache(Generic[T]):
    """Holds at most `capacity` items, dropping the least recently used; 0 holds none.
    Safe to share between threads."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._items: OrderedDict[PromptKey, T] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: PromptKey) -> T | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: PromptKey, item: T) -> None:
        if self._capacity <= 0:
            return
        with self._lock:
            self._items[key] = item
            self._items.move_to_end(key)
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)
