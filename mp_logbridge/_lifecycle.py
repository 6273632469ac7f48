"""Process life: what runs at exit, in a ``multiprocessing`` child, on SIGTERM and after a fork.

Every background worker registers here (weakly). This module makes sure that every exit path
that still runs Python code delivers what the workers hold, within their ``exit_timeout``:

* interpreter exit: an ``atexit`` hook registered when the library is imported, so it runs
  before ``logging.shutdown`` and after every hook the application registers later;
* ``multiprocessing`` children (fork, forkserver and spawn; ``Process`` and ``Pool`` workers
  ended with ``close()``/``join()``): their processes end in ``os._exit`` without ``atexit``, so a
  ``multiprocessing`` finalizer is registered in the child when its first worker starts; it runs
  before that ``os._exit``;
* SIGTERM, when the application opts in with :func:`deliver_on_signal`: the handler delivers,
  then hands the signal on (to the previous handler, or to the default action, which ends the
  process as SIGTERM would have);
* ``os.fork()``: children forget their parent's queues, threads and connections.

Exits that run no Python code (``kill -9``, ``os._exit`` called by hand, ``Pool.terminate()``,
which is what ``with Pool()`` does) lose what was still in memory: the durable spool is the
answer to those.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Iterable
from types import FrameType
from typing import Any, Protocol

from ._diagnostics import report_all

__all__ = [
    "deliver_on_signal",
    "exit_deadline",
    "exiting",
    "flush_all",
    "is_sender_thread",
    "register",
    "register_sender_thread",
    "reinit_if_forked",
    "shutdown_all",
    "start_thread",
    "unregister_sender_thread",
    "wait_limit",
]


class _Worker(Protocol):
    exit_timeout: float

    def running(self) -> bool: ...

    def begin_close(self, deadline: float, *, at_exit: bool = False) -> None: ...

    def wait_closed(self, timeout: float) -> None: ...

    def flush(self, timeout: float | None = None) -> bool: ...

    def reinit_after_fork(self) -> None: ...


_live: weakref.WeakSet[Any] = weakref.WeakSet()
_exiting = False
_exit_began = 0.0  # time.monotonic() when the exit hook (or a signal) began closing
_shutdown_lock = threading.Lock()
_closing: list[tuple[Any, float]] = []  # (worker, deadline) the exit is delivering for
_child_hook_pid = 0  # the process a multiprocessing finalizer was registered in

# Thread ident -> the process it runs in: a forked child's first thread often reuses the ident
# of a parent's sender thread, which does not exist in the child.
_sender_idents: dict[int, int] = {}


def register(worker: _Worker) -> None:
    """Let the exit hooks and the fork hook know about ``worker``."""
    _live.add(worker)


#: The longest wait a ``timeout`` argument asks for: beyond it the platform refuses to wait
#: (``OverflowError``), and ``math.inf`` means "as long as it takes".
_LONGEST_WAIT = threading.TIMEOUT_MAX / 2


def wait_limit(timeout: float | None, default: float) -> float:
    """Seconds a ``flush``/``close`` ``timeout`` argument allows: ``default`` for ``None``,
    never negative, and no longer than the platform can wait."""
    if timeout is None:
        return default
    try:
        return min(max(0.0, float(timeout)), _LONGEST_WAIT)
    except OverflowError:  # an integer too large for a float
        return _LONGEST_WAIT


def exiting() -> bool:
    """Whether the process is exiting (the exit hook has run): no thread may start any more."""
    return _exiting


def exit_deadline(timeout: float) -> float:
    """When delivery must be over (``time.monotonic()``): ``timeout`` seconds after the exit
    began, so that messages sent one by one after the exit hook share one deadline (``timeout``
    from now when the process is not exiting)."""
    return (_exit_began if _exiting else time.monotonic()) + timeout


def register_sender_thread() -> None:
    """Mark the current thread as one of the library's sender threads."""
    _sender_idents[threading.get_ident()] = os.getpid()
    _hook_multiprocessing_exit()


def unregister_sender_thread() -> None:
    """The current sender thread is ending."""
    _sender_idents.pop(threading.get_ident(), None)


#: Signals that report a fault of the thread that caused it: they must reach that thread.
_FAULT_SIGNALS = frozenset(
    getattr(signal, name)
    for name in ("SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL", "SIGTRAP", "SIGSYS", "SIGABRT")
    if hasattr(signal, name)
)


def start_thread(thread: threading.Thread) -> None:
    """Start one of the library's threads with the process's asynchronous signals blocked in it.

    The kernel hands a process-directed signal (SIGTERM, SIGINT, SIGALRM, SIGCHLD, ...) to any
    thread that does not block it. Python runs the handler on the main thread only, so a signal
    that lands on a library thread wakes nothing: a main thread asleep in a lock or a semaphore
    would sleep through it. A new thread inherits the signal mask of the thread
    that starts it, so the mask is set around ``start()`` and restored at once; a signal that
    arrives in between stays pending for the starting thread. Raises what ``start()`` raises.
    """
    sigmask = getattr(signal, "pthread_sigmask", None)
    if sigmask is None:  # pragma: no cover - Windows: no POSIX signal masks
        thread.start()
        return
    blocked = signal.valid_signals() - _FAULT_SIGNALS
    previous = sigmask(signal.SIG_BLOCK, blocked)
    try:
        thread.start()
    finally:
        sigmask(signal.SIG_SETMASK, previous)


def is_sender_thread() -> bool:
    """Whether the current thread is one of this library's sender threads."""
    pid = _sender_idents.get(threading.get_ident())
    return pid is not None and pid == os.getpid()


def logging_lock_held() -> bool:
    """Whether this thread holds the logging module's lock (``dictConfig`` does while it works)."""
    lock = getattr(logging, "_lock", None)
    is_owned = getattr(lock, "_is_owned", None)
    try:
        return bool(is_owned()) if is_owned is not None else False
    except Exception:  # pragma: no cover - private API changed shape
        return False


def shutdown_all(timeout: float | None = None) -> None:
    """Close every running worker, delivering what it holds within its ``exit_timeout``
    (or ``timeout``), then report every loss not reported yet.

    The first call decides what is closed and by when; a later one (a SIGTERM handled while the
    exit hook delivers, on its thread or another) waits for that same delivery, within the same
    deadlines, rather than let the process end in the middle of it.
    """
    global _exiting, _exit_began
    with _shutdown_lock:
        first = not _exiting
        if first:
            _exit_began = time.monotonic()
        _exiting = True
    try:
        if first:
            now = _exit_began
            _closing[:] = [
                (worker, now + (worker.exit_timeout if timeout is None else timeout))
                for worker in list(_live)
                if worker.running()
            ]
        closing = list(_closing)
        for worker, deadline in closing:
            worker.begin_close(deadline, at_exit=True)
        for worker, deadline in closing:
            worker.wait_closed(max(0.0, deadline - time.monotonic()))
    finally:
        report_all()


def flush_all(timeout: float | None = None) -> bool:
    """Flush every background worker of this process; ``True`` when all delivered everything.

    ``timeout`` bounds the whole call (the workers are flushed one after the other, sharing
    it); without it each worker waits at most its own ``flush_timeout``. Meant for the end of a
    task or a serverless invocation.
    """
    ok = True
    deadline = None if timeout is None else time.monotonic() + wait_limit(timeout, 0.0)
    for worker in list(_live):
        if worker.running():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ok = worker.flush(left) and ok
    return ok


def reinit_if_forked() -> None:
    """In a child forked without Python's fork hooks (some pre-fork servers and task pools):
    let every worker copied from the parent start afresh now, rather than at its next use."""
    pid = os.getpid()
    for worker in list(_live):
        if getattr(worker, "_pid", pid) != pid:
            worker.reinit_after_fork()


def _after_fork_in_child() -> None:
    global _exiting, _child_hook_pid
    _sender_idents.clear()  # the parent's sender threads do not exist here
    _exiting = False
    _closing.clear()
    _child_hook_pid = 0
    for worker in list(_live):
        worker.reinit_after_fork()


def _hook_multiprocessing_exit() -> None:
    """In a ``multiprocessing`` child, deliver before the ``os._exit`` that ends it.

    ``multiprocessing`` runs its finalizers (``util.Finalize`` with an exit priority) when the
    child's target returns, and only then calls ``os._exit``. The finalizer is registered the first
    time a sender thread starts in the child: registrations copied from a parent at fork are
    cleared by ``multiprocessing`` when the child starts.
    """
    global _child_hook_pid
    pid = os.getpid()
    if _child_hook_pid == pid:
        return
    module = sys.modules.get("multiprocessing")
    if module is None:
        return
    try:
        if module.parent_process() is None:
            return
        from multiprocessing import util

        # A negative priority runs after the application's own finalizers and after the child's
        # own children were joined.
        util.Finalize(None, shutdown_all, exitpriority=-100)
        _child_hook_pid = pid
    except Exception:  # pragma: no cover - never let this break sending
        pass


# --------------------------------------------------------------------------- signals

_signal_previous: dict[int, Any] = {}


def deliver_on_signal(*signals: int) -> None:
    """Deliver what is queued when one of ``signals`` (default: SIGTERM) ends the process.

    Installs a handler that closes every background worker within its ``exit_timeout`` and then
    hands the signal on: to the handler that was installed before (called as it would have been),
    or, when that was the default action, to the default action itself (the process ends by the
    signal, with the exit status the signal gives). A signal that was ignored stays ignored after
    the delivery. Call it from the main thread; calling it again is harmless.

    Without it, a SIGTERM with the default action ends the process at once and what was queued is
    lost (the durable spool keeps it).
    """
    chosen: Iterable[int] = signals or (signal.SIGTERM,)
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("deliver_on_signal() must be called from the main thread")
    for signum in chosen:
        current = signal.getsignal(signum)
        if current is _on_signal:
            continue
        _signal_previous[int(signum)] = current
        signal.signal(signum, _on_signal)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    previous = _signal_previous.get(signum, signal.SIG_DFL)
    shutdown_all()
    if callable(previous):
        previous(signum, frame)
        return
    if previous == signal.SIG_IGN:
        return
    # The default action: end the process as the signal would have.
    signal.signal(signum, signal.SIG_DFL)
    logging.shutdown()
    os.kill(os.getpid(), signum)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
# Registered at import, after ``import logging``: it runs before ``logging.shutdown`` and after
# every exit hook registered later, so messages those hooks send are still delivered.
atexit.register(shutdown_all)
