import os
import signal
import threading

import pytest

from jlora import interrupts


@pytest.mark.skipif(signal.getsignal(signal.SIGINT) is not signal.default_int_handler,
                    reason="remembers only where SIGINT has Python's default handler")
def test_a_sigint_is_raised_and_remembered_inside_and_forgotten_after():
    with interrupts.remembered_interrupts():
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # to itself: handled before kill returns to Python code
        assert interrupts.remembered()  # as it would be where the KeyboardInterrupt was lost
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert not interrupts.remembered()


def test_another_thread_or_handler_is_left_alone():
    seen = []
    thread = threading.Thread(target=lambda: seen.append(_installs()))
    thread.start()
    thread.join()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a caller's own choice
    try:
        assert seen == [False] and not _installs()
    finally:
        signal.signal(signal.SIGINT, previous)


def _installs() -> bool:
    before = signal.getsignal(signal.SIGINT)
    with interrupts.remembered_interrupts():
        return signal.getsignal(signal.SIGINT) is not before
