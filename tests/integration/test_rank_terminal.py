"""`tuneforge rank` as a person uses it: the real command in a pseudo-terminal (its controlling terminal, so
Ctrl-C and Ctrl-D are the terminal's own), on the tiny model. Rankings are parsed back with the preference
reader; a SIGKILL loses nothing already answered; a rerun resumes at the next prompt with the same answers."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from tuneforge.data.readers import read_records

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["What is the capital of France?", "Say hello.", "Count to three."]
ASK = re.compile(r"best 1-(\d), order, =, s, q, \?> ")


def _take_terminal():
    """In the child, after setsid: the pty on stdin becomes the controlling terminal (Ctrl-C -> SIGINT), and
    SIGINT is delivered as in a shell: a disposition or mask the test process inherited is not passed on."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


class Terminal:
    """The command on a pseudo-terminal: `expect` reads the screen up to a pattern, `type` sends keys."""

    def __init__(self, *args: str, cwd: Path):
        master, slave = os.openpty()
        self.proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "rank", *args], stdin=slave, stdout=slave,
                                     stderr=slave, cwd=cwd, start_new_session=True, preexec_fn=_take_terminal,
                                     env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
        # The slave stays open here until finish(): once every slave fd is closed, Linux may answer reads of the
        # master with EIO before the child's last output (the "stopped" line) has been read: a flaky test.
        self.master, self.slave, self.screen, self.seen = master, slave, "", 0

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the child closed the terminal
            data = b""
        self.screen += data.decode("utf-8", "replace").replace("\r\n", "\n")
        return bool(data)

    def expect(self, pattern: str | re.Pattern, timeout: float = 180) -> re.Match:
        """The first match of `pattern` after the previous one; what the screen shows so far if none comes."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.screen, self.seen)
            if match:
                self.seen = match.end()
                return match
            exited = self.proc.poll() is not None  # checked before the read: output before the exit is read
            if time.monotonic() > deadline or (not self._read(1.0) and exited):
                raise AssertionError(f"no {regex.pattern!r} on the screen:\n{self.screen[-3000:]}")

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def answers(self) -> tuple[int, str]:
        """(number of answers, the screen text of the prompt block) up to the next question."""
        start = self.seen
        match = self.expect(ASK)
        return int(match.group(1)), self.screen[start:match.start()]

    def finish(self, timeout: float = 60) -> int:
        try:
            code = self.proc.wait(timeout)
        finally:
            while self._read(0.1):
                pass
            os.close(self.slave)
            os.close(self.master)
        return code


@pytest.fixture
def ranking(tmp_path, tiny_model_dir):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    (tmp_path / "cfg.yaml").write_text(f"model:\n  name: {tiny_model_dir}\nrank:\n  max_new_tokens: 6\n")
    return tmp_path


def _start(folder: Path, *overrides: str) -> Terminal:
    return Terminal("cfg.yaml", "--prompts", "prompts.txt", "--out", "prefs.jsonl", *overrides, cwd=folder)


def _build_preference_examples(records, tokenizer) -> list:
    """The examples the preference builder makes of `records`, with the config's data defaults."""
    from tuneforge.config import load_config
    from tuneforge.data.builders import BuildStats, PreferenceBuilder
    kept = []
    writer = type("Writer", (), {"add": lambda self, ex: kept.append(ex)})()
    builder = PreferenceBuilder(tokenizer, load_config(None, ["data.kind=preference"]).data, writer, BuildStats())
    for record in records:
        builder.add(record)
    builder.close()
    return kept


def test_rankings_are_written_and_read_back_as_preference_data(ranking, tiny_tokenizer):
    term = _start(ranking, "rank.num_answers=3")
    n, block = term.answers()
    assert n == 3 and PROMPTS[0] in block and "--- 3 ---" in block
    for bad, hint in (("7", "there is no answer 7"), ("1 1", "listed twice"), ("what", "type the best answer")):
        term.type(bad + "\n")
        term.expect(hint)
        term.expect(ASK)  # asked again, same prompt
    term.type("?\n")
    term.expect("a full order, best first")
    term.expect(ASK)
    term.type("2 3 1\n")
    term.expect(r"written: 3 pairs")
    assert term.answers()[0] == 3 and PROMPTS[1] in term.screen.split("written: 3 pairs")[1]
    term.type("3\n")  # best of 3: 2 pairs
    term.expect(r"written: 2 pairs")
    term.answers()
    term.type("=\n")
    term.expect("all 3 prompts done")
    assert term.finish() == 0

    records = read_records(ranking / "prefs.jsonl", kind="preference").records  # as data.kind: preference reads
    assert [r.prompt for r in records] == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 2
    rows = [json.loads(line) for line in (ranking / "prefs.jsonl").read_text().splitlines()]
    first = rows[0]["rank"]["answers"]
    assert [(r.chosen, r.rejected) for r in records[:3]] == [(first[1], first[2]), (first[1], first[0]),
                                                             (first[2], first[0])]
    assert rows[0]["rank"]["seed"] == 0 and rows[3]["rank"]["seed"] == 1  # train.seed + prompt index
    examples = _build_preference_examples(records, tiny_tokenizer)  # what a dpo run would train on
    assert len(examples) == 5

    tie = json.loads((ranking / "prefs.jsonl.ties-skips").read_text())
    assert tie["prompt"] == PROMPTS[2] and tie["rank"]["decision"] == "tie"


def test_kill_loses_nothing_answered_and_a_rerun_resumes_with_the_same_answers(ranking):
    out = ranking / "prefs.jsonl"
    term = _start(ranking)
    term.answers()
    term.type("1\n")
    _, second_block = term.answers()  # prompt 2 shown: prompt 1's pair is on disk before it
    term.proc.send_signal(signal.SIGKILL)
    assert term.finish() == -signal.SIGKILL
    assert [r.prompt for r in read_records(out, kind="preference").records] == [PROMPTS[0]]
    with open(out, "ab") as fh:  # a kill in the middle of a later write
        fh.write(b'{"prompt": "Say hel')

    term = _start(ranking)
    term.expect("cut a torn last line")
    _, block = term.answers()
    shown_now, shown_before = (b[b.index("=== prompt"):] for b in (block, second_block))
    assert shown_now.startswith("=== prompt 2/3") and shown_now == shown_before  # seeded: the same answers
    term.type("\x03")  # Ctrl-C
    term.expect("1 of 3 prompts done", timeout=60)
    assert term.finish() == 130

    term = _start(ranking)
    _, block = term.answers()
    assert PROMPTS[1] in block  # Ctrl-C decided nothing
    term.type("s\n")
    _, block = term.answers()
    assert PROMPTS[2] in block
    term.type("\x04")  # Ctrl-D
    term.expect("2 of 3 prompts done")
    assert term.finish() == 0
    assert [r.prompt for r in read_records(out, kind="preference").records] == [PROMPTS[0]]
    assert json.loads((ranking / "prefs.jsonl.ties-skips").read_text())["rank"]["decision"] == "skip"


def test_a_missing_prompts_file_is_one_line_before_the_model_loads(ranking):
    r = subprocess.run([sys.executable, "-m", "tuneforge", "rank", "cfg.yaml", "--prompts", "prompts.txtt",
                        "--out", "prefs.jsonl", "model.name=/nonexistent/never-loaded"], cwd=ranking,
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--prompts: prompts.txtt: no such file; did you mean" in r.stderr.strip().splitlines()[-1]
