"""Ctrl-C in the ``jlora`` command: remembered as well as raised, so that one Python loses stops
the job all the same. A SIGINT that comes while Python runs a callback it cannot raise from (JAX's
garbage-collection callback) is only printed there ("Exception ignored in ..."), and the job ran on
to its end; ``jlora.finetune.train`` raises a remembered one before its next step.

Example:
    >>> from jlora import interrupts
    >>> with interrupts.remembered_interrupts():
    ...     interrupts.remembered()
    False
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator

_INTERRUPTED = threading.Event()


def remembered() -> bool:
    """Whether a Ctrl-C came inside ``remembered_interrupts`` (raised, or lost where it came).

    Example:
        >>> from jlora import interrupts
        >>> interrupts.remembered()
        False
    """
    return _INTERRUPTED.is_set()


@contextlib.contextmanager
def remembered_interrupts() -> Iterator[None]:
    """SIGINT remembered (``remembered()``) as well as raised as ``KeyboardInterrupt``, by the main
    thread's handler where it is Python's default; forgotten on leaving.

    Example:
        >>> from jlora import interrupts
        >>> with interrupts.remembered_interrupts():
        ...     pass
    """
    def handler(signum: int, frame: Any) -> None:
        _INTERRUPTED.set()
        raise KeyboardInterrupt

    _INTERRUPTED.clear()
    ours = (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    try:
        if ours:
            signal.signal(signal.SIGINT, handler)
        yield
    finally:
        if ours:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        _INTERRUPTED.clear()
