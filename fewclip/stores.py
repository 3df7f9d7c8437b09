"""Row stores: arrays on disk, filled row by row, shared by every process of a sweep.

A store is a folder `<root>/<key>/` holding `data.npy` ((N, *row_shape)), `state.npy` ((N,)
uint8: EMPTY, FILLED or FAILED), `checks.npy` ((N,) uint32: a CRC-32 of each row's index, state
and bytes) and `header.json` (its own key, count, dtype, row shape). The folder appears whole
(built under a temporary name, then renamed). Rows are filled under an exclusive `fcntl` lock on
`<root>/<key>.lock`, so concurrent workers never compute a row twice: the second waits, then finds
it filled. A row's check and state are written only after its data reached the file, so a crash
in the middle of a fill leaves the unfinished rows EMPTY (computed again next time).

A cache never changes a result: every row read is checked against its CRC, and a FAILED row
before it is believed. A damaged row (random bytes, permuted rows, a foreign data file) is
reported in one line naming the file and computed again (its whole chunk, so batch composition
stays fixed); a damaged folder (truncated or resized files, another store's header, unreadable
content) is reported, removed and rebuilt. Files are read and written with `pread`/`pwrite`,
never memory-mapped, so a file truncated under a reader is an error, not a SIGBUS. The lock is
`flock`: reliable on local disks; on network file systems put CACHE_DIR on a local disk.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

LOGGER = logging.getLogger(__name__)
EMPTY, FILLED, FAILED = 0, 1, 2
FORMAT = 2


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive `flock` on `path` (created if needed) for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove_stale_temporaries(folder: Path) -> None:
    """Remove `.<name>.<pid>.<id>.tmp` files and folders whose writing process is gone."""
    for path in folder.glob(".*.tmp") if folder.is_dir() else ():
        parts = path.name.split(".")
        pid = int(parts[-3]) if len(parts) >= 4 and parts[-3].isdigit() else None
        if pid is None or pid == os.getpid() or _alive(pid):
            continue
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def compute_row_checks(rows: np.ndarray, states: np.ndarray, values: np.ndarray) -> np.ndarray:
    """(n,) uint32 CRC-32 of each row's index, state and bytes; `values` (n, *row_shape)."""
    values = np.ascontiguousarray(values)
    checks = [
        zlib.crc32(values[i], zlib.crc32(f"{int(row)}:{int(state)}".encode()))
        for i, (row, state) in enumerate(zip(rows, states))
    ]
    return np.array(checks, dtype=np.uint32)


class RowStore:
    """(N, *row_shape) array of `dtype` under `<root>/<key>/`; the row shape comes from the first
    values written, so callers need not know it (e.g. a feature dimension) before computing."""

    def __init__(self, root: str | Path, key: str, count: int, dtype: np.dtype | type) -> None:
        self.root = Path(root)
        self.key = key
        self.count = count
        self.dtype = np.dtype(dtype)
        self.folder = self.root / key
        self.lock_path = self.root / f"{key}.lock"
        self._layout: tuple[tuple[int, ...], int] | None = None  # row shape, data offset
        self._locked = False
        self._refill: dict[str, tuple[list[np.ndarray], Callable]] = {}  # what fill() was given
        remove_stale_temporaries(self.root)  # of workers killed while writing here

    # ----- opening and checking the folder ---------------------------------------------------
    def _open(self) -> bool:
        """Check the folder's structure if it exists; a damaged one is reported and removed."""
        if self._layout is not None or not self.folder.exists():
            return self._layout is not None
        layout, problem = self._check_folder()
        if problem is not None:
            with self._lock():
                layout, problem = self._check_folder()  # another process may have rebuilt it
                if problem is not None:
                    self._discard(problem)
        self._layout = layout
        return layout is not None

    def _check_folder(self) -> tuple[tuple[tuple[int, ...], int] | None, str | None]:
        """(row shape, data offset) of a sound folder, else (None, what is wrong)."""
        if not self.folder.exists():
            return None, None
        try:
            header = json.loads((self.folder / "header.json").read_text())
            expected = {"format": FORMAT, "key": self.key, "count": self.count,
                        "dtype": self.dtype.str}  # fmt: skip
            for name, value in expected.items():
                if header.get(name) != value:
                    return None, f"header.json has {name} {header.get(name)!r}, not {value!r}"
            shape, dtype, offset = read_npy_header(self.folder / "data.npy")
            row_shape = tuple(header["row_shape"])
            if shape != (self.count, *row_shape) or dtype != self.dtype:
                return None, f"data.npy holds {shape} {dtype}, not {(self.count, *row_shape)}"
            row_bytes = int(np.prod(row_shape, dtype=np.int64)) * self.dtype.itemsize
            files = {
                "data.npy": (offset, self.count * row_bytes, None),
                "state.npy": (_STATE_OFFSET, self.count, np.dtype(np.uint8)),
                "checks.npy": (_CHECKS_OFFSET, 4 * self.count, np.dtype(np.uint32)),
            }
            for name, (start, size, kind) in files.items():
                if kind is not None and read_npy_header(self.folder / name) != (
                    (self.count,),
                    kind,
                    start,
                ):
                    return None, f"{name} is not a ({self.count},) {kind} array"
                actual = os.path.getsize(self.folder / name) - start
                if actual != size:
                    return None, f"{name} has {actual} bytes of rows, not {size} (truncated?)"
            return (row_shape, offset), None
        except (OSError, ValueError, KeyError, TypeError) as error:
            return None, str(error).splitlines()[0] if str(error) else type(error).__name__

    def _discard(self, problem: str) -> None:
        """Report and remove the damaged folder (lock held): it is rebuilt on the next fill."""
        LOGGER.warning("rebuilding damaged cache %s (%s)", self.folder, problem)
        doomed = self.root / f".{self.key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.folder, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        self._layout = None

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """The store's lock; re-entrant within this object (flock is not, across descriptors)."""
        if self._locked:
            yield
            return
        with exclusive_lock(self.lock_path):
            self._locked = True
            try:
                yield
            finally:
                self._locked = False

    # ----- reading ----------------------------------------------------------------------------
    def _pread(self, name: str, rows: np.ndarray, row_shape: tuple, dtype: np.dtype, offset: int):
        """Rows of one file of the folder, read run by run; a short read raises EOFError."""
        out = np.empty((len(rows), *row_shape), dtype)
        if not len(rows):
            return out
        row_bytes = out[0].nbytes
        starts = np.flatnonzero(np.diff(rows, prepend=rows[0] - 2) != 1)  # runs of rows
        ends = np.append(starts[1:], len(rows))
        with open(self.folder / name, "rb", buffering=0) as handle:
            for start, end in zip(starts.tolist(), ends.tolist()):
                buffer = memoryview(out[start:end]).cast("B")
                position = offset + int(rows[start]) * row_bytes
                if os.preadv(handle.fileno(), [buffer], position) != len(buffer):
                    raise EOFError(f"{name} is truncated")
        return out

    def _read_raw(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(values, states, checks) of `rows` as on disk, or None after discarding a folder that
        turned out damaged (or vanished) while reading."""
        if not self._open():
            return None
        row_shape, offset = self._layout
        try:
            values = self._pread("data.npy", rows, row_shape, self.dtype, offset)
            states = self._pread("state.npy", rows, (), np.dtype(np.uint8), _STATE_OFFSET)
            checks = self._pread("checks.npy", rows, (), np.dtype(np.uint32), _CHECKS_OFFSET)
        except (OSError, EOFError) as error:
            with self._lock():
                self._discard(str(error))
            return None
        return values, states, checks

    def _damaged(self, rows: np.ndarray, raw: tuple) -> np.ndarray:
        """Mask of `rows` whose state is unknown, or FILLED/FAILED with a wrong check."""
        values, states, checks = raw
        known = (states == FILLED) | (states == FAILED)
        bad = states > FAILED
        written = values if known.all() else values[known]  # no copy in the common case
        bad[known] = compute_row_checks(rows[known], states[known], written) != checks[known]
        return bad

    def _repair(self, rows: np.ndarray) -> None:
        """Mark the damaged rows among `rows` EMPTY again (re-checked under the lock)."""
        with self._lock():
            raw = self._read_raw(rows)
            if raw is None:
                return
            damaged = rows[self._damaged(rows, raw)]
            if not len(damaged):
                return
            LOGGER.warning(
                "rebuilding %d damaged row(s) of cache %s (checksum mismatch)",
                len(damaged),
                self.folder / "data.npy",
            )
            self._pwrite("state.npy", damaged, np.zeros(len(damaged), np.uint8), _STATE_OFFSET)

    def states(self, rows: np.ndarray) -> np.ndarray:
        """State of each row (all EMPTY while the store does not exist yet); a FAILED or unknown
        state is checked first (a damaged one is EMPTY: computed again)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if not self._open():
            return np.full(len(rows), EMPTY, np.uint8)
        try:
            states = self._pread("state.npy", rows, (), np.dtype(np.uint8), _STATE_OFFSET)
        except (OSError, EOFError):
            states = np.full(len(rows), FAILED + 1, np.uint8)  # checked (and discarded) below
        doubtful = rows[states >= FAILED]
        if len(doubtful):
            raw = self._read_raw(doubtful)
            if raw is None:
                return np.full(len(rows), EMPTY, np.uint8)
            if self._damaged(doubtful, raw).any():  # repaired rows are EMPTY now
                self._repair(doubtful)
                return self.states(rows)
        return states

    @property
    def row_shape(self) -> tuple[int, ...]:
        if not self._open():
            raise RuntimeError(f"row store {self.folder} does not exist yet")
        return self._layout[0]

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Checked values of `rows` (the caller has filled them), read with `pread` into a new
        array: evaluating a large set costs one batch of memory, not the whole set's pages.
        Damaged rows are computed again with what `fill` was last given."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        for _ in range(3):
            raw = self._read_raw(rows)
            if raw is not None:
                damaged = self._damaged(rows, raw)
                if not damaged.any() and not (raw[1] == EMPTY).any():
                    return raw[0]
                self._repair(rows[damaged])
            for chunks, compute in list(self._refill.values()):
                self.fill(chunks, compute, remember=False)
        raise OSError(f"row store {self.folder} stays damaged after rebuilding: check the disk")

    # ----- writing ----------------------------------------------------------------------------
    def _pwrite(self, name: str, rows: np.ndarray, values: np.ndarray, offset: int) -> None:
        """Write `values` at `rows` of one file and sync it (before anything vouches for it)."""
        values = np.ascontiguousarray(values)
        row_bytes = values[0].nbytes if len(values) else 0
        with open(self.folder / name, "r+b", buffering=0) as handle:
            for row, value in zip(rows.tolist(), values):
                os.pwrite(handle.fileno(), memoryview(value).cast("B"), offset + row * row_bytes)
            os.fdatasync(handle.fileno())

    def fill(
        self,
        chunks: Iterable[np.ndarray],
        compute: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
        remember: bool = True,
    ) -> int:
        """Compute every chunk that still has an EMPTY row; return the number of rows computed.

        `compute(rows) -> (values (len(rows), *row_shape), ok (len(rows),) bool)`; rows with ok
        False are marked FAILED. A chunk is always computed whole (so callers can keep batch
        composition fixed), but only its EMPTY rows are written: a reader never sees a row change.
        """
        chunks = [np.asarray(chunk, dtype=np.int64) for chunk in chunks if len(chunk)]
        if remember:  # by chunk composition: a sweep's repeated fills are remembered once
            joined = np.concatenate([*chunks, np.array([-1])]).tobytes() if chunks else b""
            self._refill[hashlib.sha1(joined).hexdigest()] = (chunks, compute)
        if not any((self.states(chunk) == EMPTY).any() for chunk in chunks):
            return 0
        computed = 0
        with self._lock():
            for chunk in chunks:
                empty = self.states(chunk) == EMPTY  # re-read: another worker may have filled it
                if not empty.any():
                    continue
                values, ok = compute(chunk)
                values = np.asarray(values, dtype=self.dtype)
                if len(values) != len(chunk):
                    raise ValueError(f"row store {self.key}: {len(values)} values for {len(chunk)}")
                self._create(values.shape[1:])
                if self._layout[0] != values.shape[1:]:
                    raise ValueError(
                        f"row store {self.folder} holds rows of shape {self._layout[0]}, "
                        f"not {values.shape[1:]}; delete the folder"
                    )
                targets, states = chunk[empty], np.where(np.asarray(ok)[empty], FILLED, FAILED)
                self._pwrite("data.npy", targets, values[empty], self._layout[1])
                checks = compute_row_checks(targets, states, values[empty])
                self._pwrite("checks.npy", targets, checks, _CHECKS_OFFSET)
                self._pwrite("state.npy", targets, states.astype(np.uint8), _STATE_OFFSET)
                computed += len(targets)
        return computed

    def _create(self, row_shape: tuple[int, ...]) -> None:
        """Create the folder whole (temporary name, then rename); call with the lock held."""
        if self._open():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        temporary = self.root / f".{self.key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        temporary.mkdir()
        shape = (self.count, *row_shape)
        data = np.lib.format.open_memmap(temporary / "data.npy", "w+", self.dtype, shape)
        try:  # reserve the space now: a full disk later fails here, with a message
            with open(temporary / "data.npy", "r+b") as handle:
                os.posix_fallocate(handle.fileno(), 0, os.path.getsize(handle.name))
        except OSError as error:  # other errors: the file system cannot reserve; stay sparse
            if error.errno == errno.ENOSPC:
                gigabytes = data.nbytes / 1e9
                del data
                shutil.rmtree(temporary, ignore_errors=True)
                raise OSError(
                    f"no room for {gigabytes:.2f} GB of cache under {self.root}: free disk space "
                    "or point CACHE_DIR at a larger disk"
                ) from None
        del data
        np.save(temporary / "state.npy", np.zeros(self.count, np.uint8))
        np.save(temporary / "checks.npy", np.zeros(self.count, np.uint32))
        header = {"format": FORMAT, "key": self.key, "count": self.count,
                  "dtype": self.dtype.str, "row_shape": list(row_shape)}  # fmt: skip
        (temporary / "header.json").write_text(json.dumps(header))
        os.rename(temporary, self.folder)
        self._open()


def read_npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, byte offset of the array) of an .npy file; refuses object arrays."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(handle)
        else:
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(handle)
        if dtype.hasobject or fortran_order:
            raise ValueError(f"{path.name} holds an object or Fortran-ordered array")
        return tuple(shape), dtype, handle.tell()


_STATE_OFFSET = _CHECKS_OFFSET = 128  # np.save's version 1.0 header of a 1-D array
