"""Giving back memory a process holds but no longer uses, between units of work (a layer, a linear,
a worker call).

Two kinds: heap pages glibc keeps after tensors are freed (malloc_trim), and this process's
mappings of Ray's object store. Every page of the store a process has ever read or written stays
in its page table, so counts in its resident set, until it unmaps it: after a few layers each
process's RSS included the whole store (and any of Ray's fallback files), though it used one
layer's objects at a time. Dropping those mappings (madvise MADV_DONTNEED on the store's shared
mappings) frees nothing in the store and loses no data: the pages stay in shared memory, counted
once (Shmem in /proc/meminfo), and a later read of a live object maps them again. Linux only; a
no-op elsewhere and in processes without Ray.
"""

from __future__ import annotations

import ctypes
import os

_MADV_DONTNEED = 4
_libc = None


def _c_library():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return _libc


def store_mappings(maps_text: str) -> list[tuple[int, int]]:
    """(start, end) of each mapping of Ray's object store in a /proc/<pid>/maps text: the shared
    ('s') mappings of the files Ray's plasma store allocates in (`plasmaXXXXXX`, in /dev/shm or,
    beyond the store's size, a fallback directory). Private mappings are never listed: dropping one
    would discard its data."""
    spans = []
    for line in maps_text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or len(fields[1]) < 4 or fields[1][3] != "s":
            continue
        path = fields[5].removesuffix(" (deleted)").strip()
        if os.path.basename(path).startswith("plasma"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            spans.append((start, end))
    return spans


def release_store_pages() -> int:
    """Drop this process's page-table entries of the object store's pages (see the module text);
    returns the bytes of mappings released (0 without Ray or off Linux)."""
    try:
        with open("/proc/self/maps") as f:
            spans = store_mappings(f.read())
        libc = _c_library()
    except (OSError, AttributeError):
        return 0
    released = 0
    for start, end in spans:
        if libc.madvise(start, end - start, _MADV_DONTNEED) == 0:
            released += end - start
    return released


def return_free_memory() -> None:
    """Give the OS back what this process holds and no longer uses: freed heap pages (glibc keeps
    them otherwise) and its mappings of the object store's pages."""
    try:
        _c_library().malloc_trim(0)
    except (OSError, AttributeError):  # no C library to load, or not glibc's (no malloc_trim)
        pass
    release_store_pages()
