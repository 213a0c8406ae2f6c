"""A PNG of an HTML page rendered by headless Chromium: how the report is checked to render in a browser.

    if chromium_binary():
        screenshot("report.html", "report.png", width=1300, height=2600)

Chromium is not a Python dependency: on Debian, ``apt-get install chromium``
(``make test`` tries that when it can). Running as root needs ``--no-sandbox``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional, Union

from fxopt.errors import FxoptError, InputError

BINARIES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
TIMEOUT_S = 120


def chromium_binary() -> Optional[str]:
    """The path of a Chromium (or Chrome) executable on PATH, or None."""
    for name in BINARIES:
        found = shutil.which(name)
        if found:
            return found
    return None


def screenshot(html: Union[str, Path], png: Union[str, Path], width: int = 1300, height: int = 2600) -> Path:
    """Render ``html`` (a file) in headless Chromium at ``width`` x ``height`` CSS pixels and save a PNG."""
    binary = chromium_binary()
    if binary is None:
        raise FxoptError(f"screenshot: no Chromium found (looked for {', '.join(BINARIES)}); install it, e.g. "
                         "apt-get install chromium")
    html, png = Path(html).absolute(), Path(png).absolute()
    if not html.is_file():
        raise InputError(f"screenshot: {html} is not a file; write the report first (fxopt.report.html.write_html)")
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    command = [binary, "--headless", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
               f"--screenshot={png}", f"--window-size={width},{height}", html.as_uri()]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.insert(1, "--no-sandbox")  # Chromium refuses to run as root inside its sandbox
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise FxoptError(f"screenshot: {binary} did not finish within {TIMEOUT_S} s; try a smaller page") from exc
    if not png.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise FxoptError(f"screenshot: {binary} exited {done.returncode} without writing {png}: "
                         f"{' | '.join(tail)}; run it by hand to see why")
    return png
