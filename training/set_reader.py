"""This rank's lines of one set, read in file order and wrapped around, and the same reading continued on another
number of ranks (the reshard: claims).

Everything here is exact and restartable: a SetReader's position is a handful of ints (file index, byte offset,
line number), so a resumed run seeks straight back to where it was instead of re-reading what came before.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Optional

from training.corpus import DataError, Location

logger = logging.getLogger(__name__)

FINGERPRINT_BYTES = 64 * 1024  # hashed at each end of a file: a reshuffle or rewrite changes them, at 128 KB a file


def fingerprint(path: Path) -> dict:
    """What a resume checks a corpus file against: its size, modification time, and a hash of its first and last
    64 KB (the whole file when smaller). A file rewritten in place, shuffled or cut changes at least one of them."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            digest = hashlib.sha256(f.read(FINGERPRINT_BYTES))
            if size > FINGERPRINT_BYTES:
                f.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
                digest.update(f.read(FINGERPRINT_BYTES))
            return {"size": size, "mtime_ns": os.fstat(f.fileno()).st_mtime_ns, "ends_sha256": digest.hexdigest()}
    except OSError as e:
        raise DataError(f"file {path}: cannot read: {e}") from e


def fingerprint_change(saved: dict, path: Path) -> tuple[str, bool] | None:
    """(what changed, whether the content did) between a saved fingerprint and the file now; None when nothing did.
    A new modification time alone, with the same size and ends, is reported but not taken for new content: copying
    a corpus to another disk does that."""
    if not path.is_file():
        return "the file is gone", True
    now = fingerprint(path)
    changes = []
    if now["size"] != saved["size"]:
        changes.append(f"size {saved['size']:,} -> {now['size']:,} bytes")
    if now["ends_sha256"] != saved["ends_sha256"]:
        changes.append(f"its first/last {FINGERPRINT_BYTES // 1024} KB differ")
    content = bool(changes)
    if now["mtime_ns"] != saved["mtime_ns"]:
        changes.append(f"modified {_when(saved['mtime_ns'])} -> {_when(now['mtime_ns'])}")
    return (", ".join(changes), content) if changes else None


def _when(mtime_ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(mtime_ns / 1e9))


def restart_file(position: dict, names: set[str]) -> int:
    """Set a saved reader position (or a claim) whose current file is one of `names` back to that file's start, in
    place, with its earlier claims likewise; the lines it had read of those files, which may be read again."""
    lines = 0
    for claim in position.get("claims", []):
        lines += restart_file(claim, names)
    if position["file"] in names and position["line"] > 0:
        lines += position["line"]
        position["pass_line"] -= position["line"]
        position["byte_offset"] = position["line"] = 0
    return lines



class SetReader:
    """This rank's lines of one set, in file order, wrapping around after the last file.

    Files >= ranks: the rank reads files[rank::world_size]. Fewer files than ranks: every rank reads every file
    and keeps lines rank, rank + W, ... of each pass (counted across the set's files).
    The position is plain ints (see position()), restored by seeking to a byte offset.

    Another world size (resume_from): the new ranks divide the files afresh, and what the old ranks had consumed
    comes along as `claims`, each an old reader's position with its rank and world size. A claim is exact: it says
    which lines of which pass over each file that reader had read (all of its files before its position, in its
    order, and the earlier passes). Reading skips every line some claim covers -- by seeking past a claimed prefix
    of a file, or, for a claim of a reader that shared files by line, line by line -- so no line read before the
    change is read again, and none is left out. A claim is dropped once this reader's passes are past it.
    """

    def __init__(self, set_name: str, files: list[Path], rank: int, world_size: int):
        self.set_name = set_name
        self.set_files = files  # every file of the set, in number order: what claims refer to
        self.rank, self.world_size = rank, world_size
        self.by_line = len(files) < world_size
        if not self.by_line:
            self.files = files[rank::world_size]
            self.line_stride, self.line_phase = 1, 0
        else:
            self.files = files
            self.line_stride, self.line_phase = world_size, rank
            logger.info("set '%s' has %d file(s) for %d ranks: sharding it by line (rank %d reads lines %d, %d, ...)",
                        set_name, len(files), world_size, rank, rank, rank + world_size)
        self.file_index = 0
        self.byte_offset = 0
        self.line = 0  # lines read from the current file
        self.pass_line = 0  # lines read in this pass over all files (for sharding by line)
        self.passes = 0  # completed passes over the files
        self.pass_returned = 0  # lines handed out in this pass, or skipped as read by an earlier world
        self.claims: list[dict] = []  # what the ranks of earlier world sizes had read (see the class docstring)
        self._file = None
        self._line_offsets: Optional[list[int]] = None  # lines of the set's files before each (line-shard claims)
        self.fingerprints = {path.name: fingerprint(path) for path in self.files}  # as this run found its files

    @property
    def path(self) -> Path:
        return self.files[self.file_index]

    def next_line(self) -> tuple[bytes, Location]:
        while True:
            if self._file is None and self._open():
                continue  # the whole file was read by an earlier world
            raw = self._file.readline()
            if not raw:
                self._next_file()
                continue
            self.byte_offset += len(raw)
            self.line += 1
            self.pass_line += 1
            if (self.pass_line - 1) % self.line_stride == self.line_phase:
                self.pass_returned += 1
                if self.claims and self._claimed_line():
                    continue
                return raw, Location(self.set_name, self.path, self.line)

    def _open(self) -> bool:
        """Open the current file at the position; at a file's start, first skip what the claims cover. True when the
        claims cover the whole file (then it is passed over, not opened)."""
        if self.claims and self.byte_offset == 0 and self.line == 0:
            prefix = self._claimed_prefix()
            if prefix == "all":
                self.pass_line += self._file_lines(self.file_index) if self.by_line else 0
                self.pass_returned += 1  # a pass that the claims cover whole is not a pass that gave no line
                self._next_file()
                return True
            if prefix is not None:
                self.byte_offset, self.line = prefix
                self.pass_line += self.line
                self.pass_returned += self.line
        try:
            self._file = open(self.path, "rb")
            self._file.seek(self.byte_offset)
        except OSError as e:
            raise DataError(f"set '{self.set_name}', file {self.path}: cannot read: {e}") from e
        return False

    def _next_file(self) -> None:
        self.close()
        self.file_index += 1
        self.byte_offset = self.line = 0
        if self.file_index == len(self.files):
            if self.pass_returned == 0:
                raise DataError(f"set '{self.set_name}': a whole pass over its {len(self.files)} file(s) "
                                f"({self.files[0]} ...) gave this rank no line")
            self.file_index = self.pass_line = self.pass_returned = 0
            self.passes += 1
            self.claims = [claim for claim in self.claims if claim["passes"] >= self.passes]

    def position(self) -> dict:
        position = {"file": self.path.name, "file_index": self.file_index, "byte_offset": self.byte_offset,
                    "line": self.line, "pass_line": self.pass_line, "passes": self.passes,
                    "pass_returned": self.pass_returned}
        if self.claims:
            position["claims"] = self.claims
        return position

    def seek(self, position: dict) -> None:
        index = position["file_index"]
        if not 0 <= index < len(self.files) or self.files[index].name != position["file"]:
            raise DataError(f"set '{self.set_name}': the saved data state is at file {position['file']} "
                            f"(index {index}), which is not this rank's file list any more "
                            f"({[p.name for p in self.files[:5]]} ...)")
        self.close()
        self.file_index = index
        for key in ("byte_offset", "line", "pass_line", "passes", "pass_returned"):
            setattr(self, key, int(position[key]))
        self.claims = [self._checked_claim(claim) for claim in position.get("claims", [])]

    def resume_from(self, positions: list[dict]) -> None:
        """Start this rank's share afresh after a world-size change: `positions` are the old ranks' position()s,
        each with its "rank" and "world_size" added. Their own claims (from a change before) carry on too."""
        self.close()
        claims = []
        for position in positions:
            for claim in [*position.get("claims", []), {k: v for k, v in position.items() if k != "claims"}]:
                claim = self._checked_claim(claim)
                if claim not in claims:
                    claims.append(claim)
        self.claims = claims
        # The first pass in which the claims may leave a line of this rank's files unread: every line of the passes
        # before it was read. (Old ranks can be passes apart: starting from the lowest could mean passes that give
        # nothing, which the data processor takes for an unusable set.)
        self.passes = min(self._first_open_pass(self._set_index(index)) for index in range(len(self.files)))
        self.file_index = self.byte_offset = self.line = self.pass_line = self.pass_returned = 0

    def _first_open_pass(self, j: int) -> int:
        """A pass before which the claims cover every line of set file j: that of a file-sharing claim on it (one
        more if it had gone past the file), or the lowest of a by-line world whose every rank has a claim."""
        first, by_line = 0, {}
        for claim in self.claims:
            world = claim["world_size"]
            if len(self.set_files) < world:
                by_line.setdefault(world, []).append(claim["passes"])
            elif j % world == claim["rank"]:
                first = max(first, claim["passes"] + (j // world < claim["file_index"]))
        return max([first] + [min(passes) for world, passes in by_line.items() if len(passes) == world])

    def _checked_claim(self, claim: dict) -> dict:
        keys = ("rank", "world_size", "file", "file_index", "byte_offset", "line", "pass_line", "passes")
        if any(key not in claim for key in keys):
            raise DataError(f"set '{self.set_name}': a saved reader position lacks one of {keys}: {claim}")
        claim = {key: claim[key] for key in keys}
        world, rank, index = claim["world_size"], claim["rank"], claim["file_index"]
        old_files = self.set_files[rank::world] if len(self.set_files) >= world else self.set_files
        if not 0 <= index < len(old_files) or old_files[index].name != claim["file"]:
            raise DataError(f"set '{self.set_name}': rank {rank} of {world} saved its position at file "
                            f"{claim['file']} (index {index}), which is not its share of this set's files any more "
                            f"({len(self.set_files)} files: {self.set_files[0].name} ...)")
        return claim

    def _set_index(self, file_index: int) -> int:
        return file_index if self.by_line else self.rank + file_index * self.world_size

    def _claimed_prefix(self):
        """What the claims of file-sharding readers cover of the current file in this pass: "all", (byte offset,
        lines) of a prefix, or None. (Readers that shared files by line claim lines, checked one by one.)"""
        j = self._set_index(self.file_index)
        best = None
        for claim in self.claims:
            world = claim["world_size"]
            if len(self.set_files) < world or j % world != claim["rank"]:
                continue
            if self.passes < claim["passes"] or (self.passes == claim["passes"] and j // world < claim["file_index"]):
                return "all"
            if self.passes == claim["passes"] and j // world == claim["file_index"] and claim["line"] > 0:
                if best is None or claim["line"] > best[1]:
                    best = (claim["byte_offset"], claim["line"])
        return best

    def _claimed_line(self) -> bool:
        """Whether a claim of a reader that shared files by line covers the line just read."""
        index = (self.pass_line - 1 if self.by_line
                 else self._line_offset(self._set_index(self.file_index)) + self.line - 1)  # in the pass, 0-based
        for claim in self.claims:
            world = claim["world_size"]
            if len(self.set_files) >= world or index % world != claim["rank"]:
                continue
            if self.passes < claim["passes"] or (self.passes == claim["passes"] and index < claim["pass_line"]):
                return True
        return False

    def _file_lines(self, file_index: int) -> int:
        j = self._set_index(file_index)
        return self._line_offset(j + 1) - self._line_offset(j)

    def _line_offset(self, set_index: int) -> int:
        """Lines in the set's files before set_index: the index in a pass over all files of a file's first line.
        Counted once, only where a claim shares files by line or this reader does (a set with few files)."""
        if self._line_offsets is None:
            offsets = [0]
            for path in self.set_files:
                try:
                    with open(path, "rb") as f:
                        offsets.append(offsets[-1] + sum(1 for _ in f))
                except OSError as e:
                    raise DataError(f"set '{self.set_name}', file {path}: cannot read: {e}") from e
            self._line_offsets = offsets
        return self._line_offsets[set_index]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
