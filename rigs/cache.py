"""The cache directory: ``${PYVIRTIO_CACHE:-$HOME/.cache/pyvirtio}``, with a build lock."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_dir() -> Path:
    """Return the cache directory, creating it if needed."""
    env = os.environ.get("PYVIRTIO_CACHE")
    path = Path(env) if env else Path.home() / ".cache" / "pyvirtio"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def build_lock(name: str = "build") -> Iterator[Path]:
    """Hold an exclusive lock on the cache while building into it (other processes wait)."""
    root = cache_dir()
    with (root / f".{name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield root
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
