"""A uniform random shuffle of more lines than fit in memory: scatter to temp buckets, shuffle each in memory.

Each line goes to a bucket drawn uniformly at random; each bucket is then shuffled in memory and the buckets are
read back one after another. That is a uniformly random permutation of all lines: the random bucket draw spreads
every line anywhere, and the in-memory shuffle orders each bucket freely. Memory holds one bucket at a time; a
bucket that turns out larger than the budget (bad luck, or an underestimated input) is scattered again into
sub-buckets, so the bound holds whatever the input. Deterministic for a seed and an input order.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

# Bytes a line costs in memory beyond its content: the bytes object header (33) and the list slot (8), rounded.
LINE_OVERHEAD = 48
MAX_OPEN_BUCKETS = 256  # file handles; an undersized count is fine, oversized buckets are split again


@dataclass
class _Bucket:
    path: Path
    key: str  # names the bucket in the RNG seed: same seed, same order
    lines: int = 0
    bytes: int = 0

    @property
    def cost(self) -> int:
        return self.bytes + self.lines * LINE_OVERHEAD


class ExternalShuffler:
    """add(line) every line (bytes, no newline), then iterate the shuffled lines once. Temp files live in
    work_dir (created, and removed again by close())."""

    def __init__(self, work_dir: str | Path, memory_bytes: int, expected_bytes: int, seed: int):
        if memory_bytes < 1024:
            raise ValueError(f"memory budget {memory_bytes} bytes is too small (need >= 1 KiB)")
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.memory_bytes = memory_bytes
        self.seed = seed
        # Half the budget per bucket on average leaves room for the spread of random bucket sizes.
        count = min(MAX_OPEN_BUCKETS, max(1, math.ceil(2 * expected_bytes / memory_bytes)))
        self._buckets, self._files = self._open_buckets("b", count)
        self._rng = random.Random(f"scatter seed={seed}")

    @property
    def num_buckets(self) -> int:
        return len(self._buckets)

    def _open_buckets(self, prefix: str, count: int):
        buckets = [_Bucket(self.work_dir / f"{prefix}{i:04d}.tmp", f"{prefix}{i}") for i in range(count)]
        return buckets, [open(b.path, "wb") for b in buckets]

    def add(self, line: bytes) -> None:
        i = self._rng.randrange(len(self._buckets)) if len(self._buckets) > 1 else 0
        self._files[i].write(line + b"\n")
        bucket = self._buckets[i]
        bucket.lines += 1
        bucket.bytes += len(line)

    def __iter__(self) -> Iterator[bytes]:
        for f in self._files:
            f.close()
        for bucket in self._buckets:
            yield from self._shuffled(bucket)

    def _shuffled(self, bucket: _Bucket) -> Iterator[bytes]:
        if bucket.cost <= self.memory_bytes or bucket.lines <= 1:
            with open(bucket.path, "rb") as f:
                lines = [line[:-1] for line in f]  # every line was written with its "\n"
            bucket.path.unlink()
            random.Random(f"shuffle seed={self.seed} {bucket.key}").shuffle(lines)
            yield from lines
            return
        # Too big for memory: scatter it again, into enough sub-buckets that each fits with room to spare.
        count = min(MAX_OPEN_BUCKETS, max(2, math.ceil(2 * bucket.cost / self.memory_bytes)))
        subs, files = self._open_buckets(f"{bucket.key}_", count)
        rng = random.Random(f"scatter seed={self.seed} {bucket.key}")
        with open(bucket.path, "rb") as f:
            for line in f:
                i = rng.randrange(count)
                files[i].write(line)
                subs[i].lines += 1
                subs[i].bytes += len(line) - 1
        for sub_file in files:
            sub_file.close()
        bucket.path.unlink()
        for sub in subs:
            yield from self._shuffled(sub)

    def close(self) -> None:
        for f in self._files:
            f.close()
        for path in self.work_dir.glob("*.tmp"):
            path.unlink()
        try:
            self.work_dir.rmdir()
        except OSError:
            pass
