"""How SIGINT and SIGTERM stop long work: the one stop mechanism of preprocessing and training.

Ctrl-C reaches every process of the terminal's group, Slurm's time limit and ``scancel`` send SIGTERM to every
process of the job. The main process decides what a stop means; worker processes ignore both signals
(:func:`ignore_stop_signals` in DataLoader workers, :func:`children_ignore_sigint` around spawning preprocessing
workers) so that they never print a traceback of their own.

:class:`StopRequest` is installed by the main process while the work runs:

- training (``at_once=False``): the first signal only records the request; the loop finishes its step, saves,
  and leaves. A second one raises :class:`Interrupted` at once (the last checkpoint stays: writes are atomic).
- preprocessing (``at_once=True``): every finished case is already in the cache, so the first signal raises
  :class:`Interrupted` at once and the same command continues later.

The handlers are installed explicitly, not left to Python's default: a process started in the background by a
shell inherits an ignored SIGINT. This module depends on the standard library only.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("mim_nnunet")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A stop signal that ends the work at once; ``signum`` says which (exit status 128 + signum)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopRequest:
    """SIGINT and SIGTERM while it is installed (a context manager, or :meth:`install` / :meth:`restore`).

    ``requested`` and ``signum`` tell whether, and by which signal, a stop was asked for. ``message`` is logged as
    a warning at the first signal when the work goes on (``at_once=False``), with the signal's name.
    """

    def __init__(self, at_once: bool = False, message: str = "") -> None:
        self.at_once = at_once
        self.message = message
        self.requested = False
        self.signum: int | None = None
        self._previous: dict = {}

    def install(self) -> StopRequest:
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def __enter__(self) -> StopRequest:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

    def _handle(self, signum: int, _frame) -> None:
        if self.requested or self.at_once:
            self.requested, self.signum = True, self.signum or signum
            raise Interrupted(signum)
        self.requested, self.signum = True, signum
        if self.message:
            log.warning("%s received: %s", signal.Signals(signum).name, self.message)


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: the signals are for the main process, which finishes the step, saves and
    stops the workers. A worker that died of SIGTERM would instead make the main process abort mid-step, with
    nothing saved."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


@contextmanager
def children_ignore_sigint() -> Iterator[None]:
    """Processes spawned inside inherit an ignored SIGINT: Ctrl-C (sent to the whole terminal group) is for the
    main process, which cancels the queued cases; workers would only print KeyboardInterrupt tracebacks."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
