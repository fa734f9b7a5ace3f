"""Lines of a JSONL file for a report: all of a small file, evenly spaced windows of a big one.

A big file is not read whole: `windows` slices of sample_bytes/windows each, at evenly spaced byte offsets (the
partial line after a seek is dropped), give the lines checked and the bytes per line that the record count is
estimated from.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class FileSample:
    path: Path
    size: int
    exact: bool  # every line was read
    lines: list[tuple[str, bytes]] = field(default_factory=list)  # (location, raw line) of non-blank lines
    blank: int = 0
    sampled_bytes: int = 0  # bytes of the lines read, blank ones included
    sampled_lines: int = 0

    @property
    def records(self) -> float:
        """Non-blank lines: counted when exact, else size x (non-blank lines / byte) of the sample."""
        if self.exact:
            return float(len(self.lines))
        return self.size * len(self.lines) / self.sampled_bytes if self.sampled_bytes else 0.0

    @property
    def scale(self) -> float:
        """Multiply a figure summed over the sampled lines by this to estimate it for the whole file."""
        return 1.0 if self.exact or not self.sampled_bytes else self.size / self.sampled_bytes


def sample_file(path: Path, exact_bytes: int, sample_bytes: int, windows: int = 4) -> FileSample:
    size = path.stat().st_size
    sample = FileSample(path, size, exact=size <= exact_bytes)
    with open(path, "rb") as f:
        if sample.exact:
            for number, raw in enumerate(f, 1):
                _take(sample, f"{path}:{number}", raw)
            return sample
        window = max(1, sample_bytes // windows)
        for i in range(windows):
            offset = (size - window) * i // max(1, windows - 1) if windows > 1 else 0
            f.seek(offset)
            if offset:
                f.readline()  # the rest of a line cut by the seek
            start = f.tell()
            while f.tell() - start < window:
                raw = f.readline()
                if not raw:
                    break
                _take(sample, f"{path}: line at byte {f.tell() - len(raw)}", raw)
    return sample


def _take(sample: FileSample, where: str, raw: bytes) -> None:
    sample.sampled_bytes += len(raw)
    sample.sampled_lines += 1
    if raw.strip():
        sample.lines.append((where, raw))
    else:
        sample.blank += 1
