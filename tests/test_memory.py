"""memory.release_store_pages: a process's mappings of Ray's object store are dropped, never its data."""

import numpy as np
import ray

from asft_ray.memory import release_store_pages, store_mappings

MAPS = """\
7f0000000000-7f0010000000 rw-s 00000000 00:1b 7                          /dev/shm/plasmaYugwjM (deleted)
7f0010000000-7f0010400000 rw-p 00000000 00:00 0
7f0020000000-7f0021000000 rw-s 00000000 fe:00 812                        /tmp/ray/session_x/plasmaAbc123 (deleted)
7f0030000000-7f0030100000 rw-p 00000000 00:1b 9                          /dev/shm/plasmaPrivate
7f0040000000-7f0040100000 r--s 00000000 fe:00 77                         /usr/lib/locale/locale-archive
7f0050000000-7f0050001000 r-xp 00000000 fe:00 31                         /opt/plasma/lib.so
"""


def test_only_the_shared_mappings_of_the_stores_files_are_listed():
    assert store_mappings(MAPS) == [(0x7F0000000000, 0x7F0010000000), (0x7F0020000000, 0x7F0021000000)]


def _rss_kb() -> dict:
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in f) if k.startswith("Rss")}


@ray.remote
class _Reader:
    def read_release_read(self, array):
        first = float(array.sum())
        before = _rss_kb()["RssShmem"]
        released = release_store_pages()
        after = _rss_kb()["RssShmem"]
        again = float(array.sum())  # the same object, read again after its pages were unmapped here
        return first, again, before, after, released, _rss_kb()["RssShmem"]


def test_an_actors_store_pages_leave_its_resident_set_and_its_objects_read_the_same(local_ray):
    values = np.random.default_rng(0).standard_normal(8 * 2**20 // 8)  # 8 MiB: in the store, not inline
    first, again, before, after, released, reread = ray.get(_Reader.remote().read_release_read.remote(ray.put(values)))
    assert first == again == float(values.sum())
    assert before >= 8 * 1024 and released >= values.nbytes
    assert after < 1024  # under 1 MiB of the store stays mapped
    assert reread >= 8 * 1024  # reading maps the pages again


def test_releasing_leaves_this_processs_private_memory_alone(local_ray):
    kept = np.ones(2**20)  # private (anonymous) pages of this process, which also maps the store here
    release_store_pages()
    assert float(kept.sum()) == 2**20
