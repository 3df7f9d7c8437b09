"""A sweep's worker processes: they die with the sweep process, and stop on Ctrl-C.

kill -9 or SIGTERM of the sweep process must not leave workers running cells nobody collects:
each worker asks Linux to SIGKILL it when its parent dies (PR_SET_PDEATHSIG; elsewhere a thread
watches the parent id). Ctrl-C reaches only the sweep process's handling (workers ignore
SIGINT): it cancels the cells not started and terminates the running ones, which keep their
training state, so a rerun resumes them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor


def die_with_parent(parent: int) -> None:
    """End this worker when the sweep process `parent` dies (kill -9 included): Linux's
    PR_SET_PDEATHSIG, elsewhere a thread that watches the parent id."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        watched = libc.prctl(1, signal.SIGKILL, 0, 0, 0) == 0  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        watched = False
    if not watched:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # the parent died before the watch began
        os._exit(1)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def stop_pool(pool: ProcessPoolExecutor) -> None:
    """Cancel the cells not started and terminate the workers (their cells keep their training
    state, so a rerun resumes them); returns once every worker has exited."""
    processes = list((pool._processes or {}).values())  # before shutdown forgets them
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join()
