"""`tuneforge chat` through the real command, stdin piped in, on the tiny model: multi-line messages (a \"\"\"
block with blank lines inside, a trailing backslash), a blank line that does not end the chat, /reset, /quit,
the history it keeps said at start, and --no-history."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from tuneforge.cli import main

# The README's own example prompt: an instruction, a blank line, the message it is about.
SESSION = '''"""
Route this customer message to the right team.

My parcel has been stuck at the depot for a week.
"""

Say \\
it again
/reset
What was my first message?
/quit
never answered
'''
BLOCK = "Route this customer message to the right team.\n\nMy parcel has been stuck at the depot for a week."


def test_chat_piped_session_on_the_real_command(tiny_model_dir):
    r = subprocess.run([sys.executable, "-m", "tuneforge", "chat", "--model", tiny_model_dir,
                        "--max-new-tokens", "3"], input=SESSION, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("bot> ") == 3  # the block, the continued line, the message after /reset; not after /quit
    assert "history is kept" in r.stderr and "/reset clears it" in r.stderr and "--no-history" in r.stderr
    assert "history cleared" in r.stderr


@pytest.fixture
def conversations(monkeypatch):
    """The conversations the chat hands to generation (which still runs: the spy calls through)."""
    import tuneforge.eval.generation as generation
    seen, real = [], generation.generate

    def spy(model, tokenizer, convs, *args, **kwargs):
        seen.append([dict(m) for m in convs[0]])
        return real(model, tokenizer, convs, *args, **kwargs)
    monkeypatch.setattr(generation, "generate", spy)
    return seen


def _chat(monkeypatch, model_dir, *flags):
    monkeypatch.setattr(sys, "stdin", io.StringIO(SESSION))
    assert main(["chat", "--model", model_dir, "--max-new-tokens", "3", *flags]) == 0


def test_chat_keeps_history_until_reset(monkeypatch, tiny_model_dir, conversations, capsys):
    _chat(monkeypatch, tiny_model_dir)
    first, second, third = conversations
    assert first == [{"role": "user", "content": BLOCK}]
    assert [m["role"] for m in second] == ["user", "assistant", "user"] and second[0]["content"] == BLOCK
    assert second[2]["content"] == "Say \nit again"
    assert third == [{"role": "user", "content": "What was my first message?"}]  # /reset cleared the history


def test_chat_no_history_answers_each_message_alone(monkeypatch, tiny_model_dir, conversations, capsys):
    _chat(monkeypatch, tiny_model_dir, "--no-history")
    assert [len(c) for c in conversations] == [1, 1, 1]
    assert conversations[1] == [{"role": "user", "content": "Say \nit again"}]
    assert "no history" in capsys.readouterr().err


@pytest.mark.parametrize("lines, expected", [
    (['"""one line"""'], ("message", "one line")),
    (['"""  def f():', "      return 1", '"""'], ("message", "  def f():\n      return 1")),
    (['"""', "pasted, then Ctrl-D", ""], ("message", "pasted, then Ctrl-D")),  # the end of input closes a block
    (["", "   ", "/etc/hosts is what?"], ("message", "/etc/hosts is what?")),  # a path is not a command
    (["  /quit  "], ("command", "/quit")),
])
def test_read_message(lines, expected):
    from tuneforge.repl import read_message
    feed = iter(lines)

    def read_line(prompt):
        line = next(feed, None)
        if line is None:
            raise EOFError
        return line
    assert read_message(read_line) == expected
