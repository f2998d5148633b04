"""Logging hygiene for the daemons: rate limits and secret redaction.

Why this exists: a server faces the internet.  Anyone can send it junk at
line rate, and every dropped datagram has a reason worth a DEBUG line -- so
without a limit an attacker turns ``-v`` (or a chatty warning) into a disk
filler and a CPU sink.  And a daemon handles secrets (auth tokens, passwords,
data-channel keys) whose only safe place in a log is nowhere.

Both protections are :class:`logging.Filter` objects meant for the
*handlers* of a daemon (a handler filter sees every record, whichever logger
it came from); :func:`harden` installs both on a handler.  Code that wants a
limit at one hot call site regardless of the handler can use
:class:`RateLimiter` directly.

OpenVPN's precedent: it redacts ``auth-token`` in logged control messages
(``sanitize_control_message``) and has ``--mute`` for repeated messages.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from typing import Callable, Hashable

__all__ = ["RateLimiter", "RateLimitFilter", "RedactFilter", "harden", "redact"]

#: Defaults for :func:`harden`: 20 messages at once per call site, then 5 per second.
DEFAULT_BURST = 20
DEFAULT_RATE = 5.0
REDACTED = "[REDACTED]"


class RateLimiter:
    """Token buckets keyed by anything hashable (a call site, an address, ...).

    ``allow(key)`` returns ``(emit, suppressed)``: whether to emit now, and
    how many messages of that key were swallowed since the last one emitted
    (so the emitted line can say so).  The number of keys is bounded
    (``max_keys``): the oldest is forgotten first, so an attacker choosing
    keys (e.g. source addresses) cannot grow it without limit.
    """

    def __init__(self, rate: float = DEFAULT_RATE, burst: int = DEFAULT_BURST, *,
                 max_keys: int = 1024, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate must be > 0, burst and max_keys >= 1")
        self.rate = float(rate)
        self.burst = int(burst)
        self.max_keys = int(max_keys)
        self.clock = clock
        self._lock = threading.Lock()
        # key -> [tokens, last refill time, suppressed count]
        self._buckets: dict[Hashable, list[float]] = {}

    def allow(self, key: Hashable = None) -> tuple[bool, int]:
        now = self.clock()
        with self._lock:
            b = self._buckets.get(key)
            if b is None:
                if len(self._buckets) >= self.max_keys:
                    self._buckets.pop(next(iter(self._buckets)))
                b = self._buckets[key] = [float(self.burst), now, 0]
            b[0] = min(float(self.burst), b[0] + (now - b[1]) * self.rate)
            b[1] = now
            if b[0] >= 1.0:
                b[0] -= 1.0
                suppressed = int(b[2])
                b[2] = 0
                return True, suppressed
            b[2] += 1
            return False, 0

    def suppressed(self, key: Hashable = None) -> int:
        with self._lock:
            b = self._buckets.get(key)
            return int(b[2]) if b is not None else 0


class RateLimitFilter(logging.Filter):
    """Limit records per call site (logger name, level, source file and line).

    Keying by the call site means one noisy site ("dropped: %s" under a
    flood) cannot starve the others ("peer 3 connected").  When a site emits
    again after being muted, its line gets ``(N similar messages
    suppressed)`` appended.  Records at or above ``exempt_level`` (default
    CRITICAL) always pass.
    """

    def __init__(self, rate: float = DEFAULT_RATE, burst: int = DEFAULT_BURST, *,
                 exempt_level: int = logging.CRITICAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.limiter = RateLimiter(rate, burst, clock=clock)
        self.exempt_level = exempt_level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= self.exempt_level:
            return True
        emit, suppressed = self.limiter.allow(
            (record.name, record.levelno, record.pathname, record.lineno))
        if emit and suppressed:
            record.msg = f"{record.getMessage()} ({suppressed} similar messages suppressed)"
            record.args = None
        return emit


# "auth-token SECRET" / "auth-token-user B64" in pushed options, control messages, argv
_TOKEN_RE = re.compile(r"(?i)\b(auth-token(?:-user)?)([ \t]+)([^\s,]+)")
# key=value secrets in env dumps / URLs / options text
_KV_RE = re.compile(r"(?i)\b(password|passwd|auth[_-]?token|secret|private[_-]?key)"
                    r"(\s*[=:]\s*)([^\s,;&]+)")
_PEM_RE = re.compile(r"-----BEGIN ([A-Z0-9 ]*(?:PRIVATE KEY|OpenVPN Static key V1|"
                     r"OpenVPN tls-crypt-v2 (?:server|client) key))-----.*?"
                     r"-----END \1-----", re.S)


def redact(text: str) -> str:
    """``text`` with auth tokens, ``password=...`` values and secret PEM blocks replaced."""
    if not text:
        return text
    text = _PEM_RE.sub(lambda m: f"-----BEGIN {m.group(1)}----- {REDACTED} "
                                 f"-----END {m.group(1)}-----", text)
    text = _TOKEN_RE.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    return _KV_RE.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)


class RedactFilter(logging.Filter):
    """Apply :func:`redact` to every record's final message (and its exception text)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string is logging's problem to report
            return True
        clean = redact(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def harden(handler: logging.Handler, *, rate: float = DEFAULT_RATE,
           burst: int = DEFAULT_BURST) -> logging.Handler:
    """Install redaction (first) and the per-call-site rate limit on ``handler``."""
    if not any(isinstance(f, RedactFilter) for f in handler.filters):
        handler.addFilter(RedactFilter())
    if not any(isinstance(f, RateLimitFilter) for f in handler.filters):
        handler.addFilter(RateLimitFilter(rate, burst))
    return handler
