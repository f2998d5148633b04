"""A process inside a test host whose log file is what tests wait on and assert on.

Stock ``openvpn`` peers and our own daemons are both watched the same way:
"wait until the log says X (since mark M)", "how often did it say Y", "show
the tail when something fails".  One implementation keeps the waiting and the
error messages identical for both.
"""
from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Any

from bsd_ovpn.errors import OvpnError


class LoggedProcess:
    """Mixin: needs ``proc`` (a Popen, or None before start), ``log_path``, ``name``, ``host``.

    ``error`` is the exception class raised on a timeout or an early exit; the
    message always ends with the log's tail, which is what explains a failure.
    """

    error: type[OvpnError] = OvpnError
    proc: subprocess.Popen[Any] | None
    log_path: Path
    name: str
    host: Any
    tail_lines: int = 60

    def _what(self) -> str:
        return f"{self.name} in {self.host.name}"

    @property
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int | None = None) -> str:
        return "\n".join(self.log.splitlines()[-(lines or self.tail_lines):])

    def mark(self) -> int:
        """Current log length; pass to ``wait_for(since=)`` to ignore older lines."""
        return len(self.log)

    def count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.log))

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def wait_for(self, pattern: str, timeout: float = 30.0, *, since: int = 0) -> re.Match[str]:
        """Wait until ``pattern`` (a regex) appears in the log after offset ``since``."""
        if self.proc is None:
            raise self.error(f"{self._what()} was never started")
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.log, since)
            if m:
                return m
            if self.proc.poll() is not None:
                m = rx.search(self.log, since)       # written just before it exited
                if m:
                    return m
                raise self.error(f"{self._what()} exited with status {self.proc.returncode} "
                                 f"before logging {pattern!r}:\n{self.log_tail()}")
            if time.monotonic() >= deadline:
                raise self.error(f"{self._what()} did not log {pattern!r} within "
                                 f"{timeout:g} s:\n{self.log_tail()}")
            time.sleep(0.05)
