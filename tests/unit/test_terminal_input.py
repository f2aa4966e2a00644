"""repl.terminal_input on a real pseudo-terminal: lines one per call (pasted lines too), Ctrl-D on an empty
line is EOFError, and a Ctrl-C that arrives while it waits raises KeyboardInterrupt at once."""

from __future__ import annotations

import os
import signal
import sys
import threading

import pytest

from tuneforge import repl

pytestmark = pytest.mark.skipif(os.name != "posix", reason="a POSIX pseudo-terminal")


@pytest.fixture
def terminal(monkeypatch):
    master, slave = os.openpty()
    stdin = os.fdopen(slave, "r", closefd=False)
    monkeypatch.setattr(sys, "stdin", stdin)
    repl._unread.clear()
    yield master
    stdin.close()
    os.close(slave)
    os.close(master)


def test_lines_one_per_call_and_ctrl_d(terminal, capsys):
    os.write(terminal, "first\nsécond\n".encode())  # pasted: both lines in one read
    assert repl.terminal_input("you> ") == "first"
    assert repl.terminal_input("you> ") == "sécond"
    assert capsys.readouterr().out == "you> you> "
    os.write(terminal, b"\x04")  # Ctrl-D on an empty line
    with pytest.raises(EOFError):
        repl.terminal_input("you> ")


def test_a_signal_while_waiting_raises_at_once(terminal):
    timer = threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            repl.terminal_input("you> ")
    finally:
        timer.cancel()
    assert signal.set_wakeup_fd(-1) == -1  # the wakeup fd it set is gone again


def test_not_a_terminal_is_plain_input(monkeypatch):
    import io
    monkeypatch.setattr(sys, "stdin", io.StringIO("piped\n"))
    assert repl.terminal_input("") == "piped"
