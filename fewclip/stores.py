"""Row stores: memory-mapped arrays on disk, filled row by row, shared by every process of a sweep.

A store is a folder `<root>/<key>/` holding `data.npy` ((N, *row_shape)) and `state.npy` ((N,)
uint8: EMPTY, FILLED or FAILED). The folder appears whole (built under a temporary name, then
renamed). Rows are filled under an exclusive `fcntl` lock on `<root>/<key>.lock`, so concurrent
workers never compute a row twice: the second waits, then finds it filled. A row's state is set
only after its data is flushed, so a reader that sees FILLED reads a whole row, and a crash in
the middle of a fill leaves the unfinished rows EMPTY (computed again next time). The lock is
`flock`: reliable on local disks; on network file systems put CACHE_DIR on a local disk.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

EMPTY, FILLED, FAILED = 0, 1, 2


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
        self._data: np.ndarray | None = None
        self._state: np.ndarray | None = None

    def _open(self) -> bool:
        """Map the store read-only if it exists (the maps see other processes' writes)."""
        if self._state is None and (self.folder / "state.npy").exists():
            self._state = np.load(self.folder / "state.npy", mmap_mode="r")
            self._data = np.load(self.folder / "data.npy", mmap_mode="r")
        return self._state is not None

    def states(self, rows: np.ndarray) -> np.ndarray:
        """State of each row (all EMPTY while the store does not exist yet)."""
        if not self._open():
            return np.full(len(rows), EMPTY, np.uint8)
        return np.asarray(self._state[rows])

    @property
    def row_shape(self) -> tuple[int, ...]:
        if not self._open():
            raise RuntimeError(f"row store {self.folder} does not exist yet")
        return tuple(self._data.shape[1:])

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Values of `rows` (the caller has filled them), read with `pread` into a new array.

        Reading, not indexing the memory map, keeps the rows out of this process's resident
        memory: evaluating a large set costs one batch of memory, not the whole set's pages.
        """
        if not self._open():
            raise RuntimeError(f"row store {self.folder} does not exist yet")
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((len(rows), *self._data.shape[1:]), self._data.dtype)
        if not len(rows):
            return out
        row_bytes = out[0].nbytes
        starts = np.flatnonzero(np.diff(rows, prepend=rows[0] - 2) != 1)  # runs of rows
        ends = np.append(starts[1:], len(rows))
        with open(self.folder / "data.npy", "rb", buffering=0) as handle:
            for start, end in zip(starts.tolist(), ends.tolist()):
                buffer = memoryview(out[start:end]).cast("B")
                offset = self._data.offset + int(rows[start]) * row_bytes
                if os.preadv(handle.fileno(), [buffer], offset) != len(buffer):
                    raise OSError(f"row store {self.folder}/data.npy is truncated")
        return out

    def fill(
        self,
        chunks: Iterable[np.ndarray],
        compute: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    ) -> int:
        """Compute every chunk that still has an EMPTY row; return the number of rows computed.

        `compute(rows) -> (values (len(rows), *row_shape), ok (len(rows),) bool)`; rows with ok
        False are marked FAILED. A chunk is always computed whole (so callers can keep batch
        composition fixed), but only its EMPTY rows are written: a reader never sees a row change.
        """
        chunks = [np.asarray(chunk, dtype=np.int64) for chunk in chunks if len(chunk)]
        if not any((self.states(chunk) == EMPTY).any() for chunk in chunks):
            return 0
        computed = 0
        with exclusive_lock(self.lock_path):
            for chunk in chunks:
                empty = self.states(chunk) == EMPTY  # re-read: another worker may have filled it
                if not empty.any():
                    continue
                values, ok = compute(chunk)
                values = np.asarray(values, dtype=self.dtype)
                if len(values) != len(chunk):
                    raise ValueError(f"row store {self.key}: {len(values)} values for {len(chunk)}")
                self._create(values.shape[1:])
                writable_data = np.load(self.folder / "data.npy", mmap_mode="r+")
                writable_state = np.load(self.folder / "state.npy", mmap_mode="r+")
                if writable_data.shape[1:] != values.shape[1:]:
                    raise ValueError(
                        f"row store {self.folder} holds rows of shape {writable_data.shape[1:]}, "
                        f"not {values.shape[1:]}; delete the folder"
                    )
                targets = chunk[empty]
                writable_data[targets] = values[empty]
                writable_data.flush()  # data reaches the file before its state says FILLED
                writable_state[targets] = np.where(np.asarray(ok)[empty], FILLED, FAILED)
                writable_state.flush()
                del writable_data, writable_state
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
        try:  # reserve the space now: a full disk later would kill the process (SIGBUS)
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
        os.rename(temporary, self.folder)
        self._open()
