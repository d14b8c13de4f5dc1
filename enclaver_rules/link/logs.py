"""The log stream (vsock 17001) as the host side reads it: raw bytes, no framing.

odyn sends what is still in its log ring, then live output: the app's stdout and stderr as they
came, and odyn's own lines (each starting `odyn: `). A reader that fell more than the ring behind
gets one line in the stream saying how many bytes it missed. Once the app has exited and its
output is drained, odyn half-closes the stream: end-of-stream means nothing more will come.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

CHUNK = 1 << 16


async def follow(reader: asyncio.StreamReader, sink: Callable[[bytes], object], chunk: int = CHUNK) -> None:
    """Hand each chunk of the log stream to `sink` as it comes, and return at end-of-stream. Chunks
    split lines anywhere (the stream is bytes, not lines). A broken connection raises."""
    while data := await reader.read(chunk):
        sink(data)
