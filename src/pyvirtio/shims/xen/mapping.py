"""Guest pages mapped into this process as a Python ``mmap``.

``mmap.close()`` refuses to unmap while a memoryview into the mapping is alive, so a cache or a
request can never pull guest memory from under a device that still uses it: :meth:`close`
simply says False and the mapping stays until the views are gone.
"""

from __future__ import annotations

import mmap


class MmapMapping:
    def __init__(self, m: mmap.mmap) -> None:
        self.mmap = m
        self.view = memoryview(m)

    def close(self) -> bool:
        """Unmap; False (and still mapped) while views into the mapping are alive."""
        self.view.release()
        try:
            self.mmap.close()
        except BufferError:
            self.view = memoryview(self.mmap)
            return False
        self.unmapped()
        return True

    def unmapped(self) -> None:
        """Called once the pages are unmapped (grants are released here)."""
