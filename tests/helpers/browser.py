"""Headless Chromium for the report tests: the DOM after the page's scripts ran, and its console messages.

Chromium comes from Debian's packages (`.ci/run` installs it and sets TUNEFORGE_REQUIRE_BROWSER=1, so in CI
these tests fail rather than skip without it)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CONSOLE = re.compile(r":CONSOLE[:(]")


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get("TUNEFORGE_REQUIRE_BROWSER") == "1":
        pytest.fail("no Chromium on PATH: install it (Debian: apt-get install chromium)")
    pytest.skip("no Chromium on PATH (Debian: apt-get install chromium)")


def _run(page: Path, *flags: str) -> subprocess.CompletedProcess:
    cmd = [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--enable-logging=stderr", "--v=0", f"--user-data-dir={page.parent / '.chromium'}", *flags,
           page.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def render(page: Path) -> tuple[str, list[str]]:
    """(the DOM once the page's scripts ran, the console messages it printed)."""
    r = _run(page, "--dump-dom")
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout, [line for line in r.stderr.splitlines() if CONSOLE.search(line)]


def screenshot(page: Path, png: Path, width: int = 1280, height: int = 1800) -> Path:
    r = _run(page, f"--screenshot={png}", f"--window-size={width},{height}", "--hide-scrollbars")
    assert r.returncode == 0 and png.is_file(), r.stderr[-2000:]
    return png
