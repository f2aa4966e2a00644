"""The terminal loop of `tuneforge chat`: multi-line messages, a few slash commands, history kept or not.

Why multi-line input: prompts worth testing a tuned model on span lines (an instruction, a blank line, the text
it is about: the README's own example), and pasted text has blank lines. So a blank line no longer ends the
chat (`/quit` or Ctrl-D does), a `\"\"\"` line opens a block that the next `\"\"\"` closes, and a line ending in a
backslash continues on the next one.
"""

from __future__ import annotations

import os
import select
import signal
import sys
from typing import Callable

BLOCK = '"""'
PROMPT, MORE = "you> ", "...> "
QUIT, RESET, HELP = ("/quit", "/exit"), "/reset", "/help"
ADAPTER = "/adapter"  # "/adapter" lists the adapters, "/adapter NAME" switches (chat with several adapters)

HOW_TO = ('multi-line message: a line """ opens it and another """ sends it (blank lines inside are kept), '
          "or end a line with \\ to go on; /quit or Ctrl-D ends the chat")


_unread = bytearray()  # what terminal_input read past the end of the line it returned (pasted lines)


def terminal_input(prompt: str = "") -> str:
    """input() for an interactive terminal, without its Ctrl-C race.

    input() writes the prompt and then blocks in read(); a Ctrl-C that lands between the two (a script, or a
    person, typing it as the prompt appears) is handled by the C-level signal handler and then nothing wakes
    the read up: the program hangs until Enter. Here the signal's wakeup byte (signal.set_wakeup_fd) is
    selected together with the terminal, so a Ctrl-C at any moment raises KeyboardInterrupt. Ctrl-D on an empty
    line raises EOFError, as input() does. Not a POSIX terminal, or not the main thread: input() itself."""
    try:
        fd = sys.stdin.fileno()
        interactive = os.name == "posix" and os.isatty(fd)
    except (AttributeError, OSError, ValueError):  # replaced by a StringIO (tests), or closed
        interactive = False
    if not interactive:
        return input(prompt)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    try:
        previous = signal.set_wakeup_fd(wake_w)
    except ValueError:  # not the main thread
        os.close(wake_r)
        os.close(wake_w)
        return input(prompt)
    try:
        sys.stdout.write(prompt)
        sys.stdout.flush()
        while b"\n" not in _unread:
            ready, _, _ = select.select([fd, wake_r], [], [])
            if wake_r in ready:
                os.read(wake_r, 512)  # a signal came: its Python handler runs at the loop's next step
                continue
            data = os.read(fd, 4096)
            if not data:  # Ctrl-D: the end of input
                if not _unread:
                    raise EOFError
                break
            _unread.extend(data)
        end = _unread.find(b"\n")
        end = len(_unread) if end < 0 else end
        line = bytes(_unread[:end])
        del _unread[:end + 1]
        return line.decode("utf-8", "replace")
    finally:
        signal.set_wakeup_fd(previous)
        os.close(wake_r)
        os.close(wake_w)


def banner(keep_history: bool) -> str:
    if keep_history:
        memory = ("history is kept: each reply sees the whole conversation so far, which changes answers; "
                  "/reset clears it (--no-history answers each message alone)")
    else:
        memory = "no history (--no-history): each message is answered alone"
    return f"chat: {memory}.\n{HOW_TO}."


def read_message(read_line: Callable[[str], str], adapters: bool = False) -> tuple[str, str]:
    """("command", "/reset") or ("message", text) from `read_line(prompt)`, which raises EOFError at the end.

    Blank lines between messages are skipped. Commands are single lines, exactly as listed: any other text,
    "/" included, is a message.
    """
    while True:
        line = read_line(PROMPT)
        text = line.strip()
        if not text:
            continue
        if text in (*QUIT, RESET, HELP) or (adapters and (text == ADAPTER or text.startswith(ADAPTER + " "))):
            return "command", text
        if text.startswith(BLOCK):
            return "message", _block(text[len(BLOCK):], read_line)
        if line.rstrip().endswith("\\"):
            return "message", _continued(line, read_line)
        return "message", text


def _block(first: str, read_line) -> str:
    """Lines up to the one ending in the closing marker (`first`: what followed the opening one); the end of
    input closes a block too, so a pasted block followed by Ctrl-D is still sent."""
    lines = []
    line = first
    while True:
        if line.rstrip().endswith(BLOCK):
            lines.append(line.rstrip()[:-len(BLOCK)])
            break
        lines.append(line)
        try:
            line = read_line(MORE)
        except EOFError:
            break
    return "\n".join(lines).strip("\n")


def _continued(line: str, read_line) -> str:
    lines = []
    while line.rstrip().endswith("\\"):
        lines.append(line.rstrip()[:-1])
        try:
            line = read_line(MORE)
        except EOFError:
            line = ""
            break
    lines.append(line)
    return "\n".join(lines).strip()


def chat_loop(respond: Callable[[list[dict]], str], keep_history: bool = True,
              read_line: Callable[[str], str] = terminal_input, write: Callable[[str], None] = print,
              note: Callable[[str], None] | None = None, switch: Callable[[str | None], str] | None = None) -> None:
    """Read messages until /quit or the end of input; `respond(conversation)` gives the assistant's reply.

    Human notes (the banner, "history cleared") go to `note`, stderr by default, replies to `write`. With
    `switch` (several adapters on one base), "/adapter NAME" calls switch(NAME) and "/adapter" switch(None);
    what it returns is noted (the adapter now answering, or the list). The history is kept across a switch.
    """
    note = note or (lambda text: print(text, file=sys.stderr, flush=True))
    note(banner(keep_history) + ("\n/adapter lists the adapters, /adapter NAME switches to one" if switch else ""))
    history: list[dict] = []
    while True:
        try:
            kind, text = read_message(read_line, adapters=switch is not None)
        except EOFError:
            break
        if kind == "command":
            if text in QUIT:
                break
            if text == RESET:
                history = []
                note("history cleared")
            elif switch is not None and (text == ADAPTER or text.startswith(ADAPTER + " ")):
                note(switch(text[len(ADAPTER):].strip() or None))
            else:
                note(HOW_TO + "; /reset clears the history" + ("; /adapter [NAME] lists or switches adapters"
                                                                if switch else ""))
            continue
        conversation = [*history, {"role": "user", "content": text}] if keep_history else \
            [{"role": "user", "content": text}]
        reply = respond(conversation)
        if keep_history:
            history = [*conversation, {"role": "assistant", "content": reply}]
        write(f"bot> {reply}")
