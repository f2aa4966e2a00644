"""The terminal loop of `tuneforge chat`: multi-line messages, a few slash commands, history kept or not.

Why multi-line input: prompts worth testing a tuned model on span lines (an instruction, a blank line, the text
it is about: the README's own example), and pasted text has blank lines. So a blank line no longer ends the
chat (`/quit` or Ctrl-D does), a `\"\"\"` line opens a block that the next `\"\"\"` closes, and a line ending in a
backslash continues on the next one.
"""

from __future__ import annotations

import sys
from typing import Callable

BLOCK = '"""'
PROMPT, MORE = "you> ", "...> "
QUIT, RESET, HELP = ("/quit", "/exit"), "/reset", "/help"
ADAPTER = "/adapter"  # "/adapter" lists the adapters, "/adapter NAME" switches (chat with several adapters)

HOW_TO = ('multi-line message: a line """ opens it and another """ sends it (blank lines inside are kept), '
          "or end a line with \\ to go on; /quit or Ctrl-D ends the chat")


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
              read_line: Callable[[str], str] = input, write: Callable[[str], None] = print,
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
