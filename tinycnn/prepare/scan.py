"""The strict decode check of every image, in a pool of worker processes that die with their parent.

A truncated, non-JPEG or wrongly sized image is refused before anything is written; the shards keep
the original JPEG bytes. The size is read from the JPEG's frame header before decoding: a header that
claims a huge image (a decompression bomb) is refused without allocating it.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
import warnings
from collections import deque
from typing import List

from .sources import Item, Source

IMAGE_SIZE = 64
_CHUNK = 256            # images per decode-check task
_MIN_POOL_IMAGES = 2000  # below this a process pool costs more than it saves

# start-of-frame markers (baseline, progressive, lossless, arithmetic...): all of 0xC0-0xCF but DHT, JPG, DAC
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE_MARKERS = frozenset(range(0xD0, 0xD8)) | {0x01}  # RSTn, TEM: no length field


def jpeg_frame(data: bytes):
    """(height, width, components) from a JPEG's frame header, read without decoding; None when no
    frame header comes before the image data (a damaged file)."""
    pos, end = 2, len(data)  # past the start-of-image marker
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None  # not at a marker: the segment lengths do not add up
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _STANDALONE_MARKERS:
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header before them
            return None
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in _SOF_MARKERS:
            if length < 8 or pos + 10 > end:
                return None
            return (int.from_bytes(data[pos + 5:pos + 7], "big"), int.from_bytes(data[pos + 7:pos + 9], "big"),
                    data[pos + 9])
        if length < 2:
            return None
        pos += 2 + length
    return None


def check_jpeg(data: bytes):
    """Channel count (1 or 3) of a valid 64x64 JPEG, else the reason it is refused."""
    if not data.startswith(b"\xff\xd8"):
        return "not a JPEG (no start-of-image marker)"
    # libjpeg decodes a truncated file with a grey bottom and (in older torchvision) only a warning:
    # the end-of-image marker is the sure sign of a complete file
    if not data.rstrip(b"\0\r\n ").endswith(b"\xff\xd9"):
        return "truncated JPEG (no end-of-image marker)"
    # the size from the header, before decoding: a forged 60000x60000 header must not cost 10 GB
    frame = jpeg_frame(data)
    if frame is None:
        return "JPEG does not decode (no frame header before the image data)"
    h, w, _ = frame
    if (h, w) != (IMAGE_SIZE, IMAGE_SIZE):
        return f"image is {w}x{h}, expected {IMAGE_SIZE}x{IMAGE_SIZE}"
    try:
        shape = _decode_shape(data)
    except (RuntimeError, UserWarning, OSError, SyntaxError) as e:
        return f"JPEG does not decode ({str(e).rsplit(', ', 1)[-1].strip()})"
    c, h, w = shape
    if (h, w) != (IMAGE_SIZE, IMAGE_SIZE):
        return f"image is {w}x{h}, expected {IMAGE_SIZE}x{IMAGE_SIZE}"
    if c not in (1, 3):
        return f"image has {c} channels, expected 1 (grayscale) or 3"
    return c


def _decode_shape(data: bytes):
    """(channels, height, width) after a full decode; raises on a damaged image."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # libjpeg's "premature end of data" must not pass
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 deprecates its decoders
        try:
            import torch
            from torchvision.io import ImageReadMode, decode_jpeg
        except ImportError:  # a torchvision without image decoding: PIL, strict by default
            import io
            from PIL import Image
            with Image.open(io.BytesIO(data)) as im:
                if im.format != "JPEG":
                    raise OSError(f"a {im.format} image, not a JPEG")
                im.load()
                return len(im.getbands()), im.height, im.width
        return tuple(decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                 mode=ImageReadMode.UNCHANGED).shape)


def _check_jpegs(blobs: List[bytes]) -> list:
    return [check_jpeg(b) for b in blobs]


def _die_with_parent(parent: int):
    """End this worker when its parent dies, even by SIGKILL (no orphaned workers): on Linux the kernel
    kills it (PR_SET_PDEATHSIG); elsewhere a thread notices that the parent changed."""
    if sys.platform.startswith("linux"):
        import ctypes
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    else:
        threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # the parent died before this took effect
        os._exit(1)


def _exit_when_orphaned(parent: int, every: float = 0.5):
    while os.getppid() == parent:
        time.sleep(every)
    os._exit(1)


def _init_worker(parent: int):
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent shuts the pool down
    import torch
    torch.set_num_threads(1)  # one process per core already


@contextlib.contextmanager
def make_pool(workers: int, total: int):
    """Worker processes for the decode check and the shard writing; None: do it in this process."""
    if workers <= 1 or total < _MIN_POOL_IMAGES:  # a pool costs more than it saves on small inputs
        yield None
        return
    from concurrent.futures import ProcessPoolExecutor
    # fork: workers start at once and need not re-import torch (spawn would cost seconds per worker)
    ctx = multiprocessing.get_context("fork") if sys.platform.startswith("linux") else None
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                               initargs=(os.getpid(),))
    try:
        pool.submit(int).result()  # fork all workers now, before the progress bar starts its thread
        yield pool
    finally:
        pool.shutdown(cancel_futures=True)


def scan(src: Source, pool, advance) -> List[Item]:
    """Read every image (sequentially) and decode-check it (in parallel); errors land on the items."""
    items: List[Item] = []
    pending = deque()  # (item indices, future)

    def settle(idx, results):
        for i, r in zip(idx, results):
            if isinstance(r, str):
                items[i].error = r
            else:
                items[i].gray = r == 1
        advance(len(idx))

    def submit(idx):
        blobs = [items[i].data for i in idx]
        if pool is None:
            settle(idx, _check_jpegs(blobs))
        else:
            pending.append((idx, pool.submit(_check_jpegs, blobs)))
            while pending and pending[0][1].done():
                i, fut = pending.popleft()
                settle(i, fut.result())

    chunk = []
    for it in src.items:
        items.append(it)
        if it.error:
            advance(1)
            continue
        chunk.append(len(items) - 1)
        if len(chunk) == _CHUNK:
            submit(chunk)
            chunk = []
    if chunk:
        submit(chunk)
    while pending:
        i, fut = pending.popleft()
        settle(i, fut.result())
    return items
