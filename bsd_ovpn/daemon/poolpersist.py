"""``ifconfig-pool-persist FILE [SECONDS]``: a returning common name gets its old address.

The file has OpenVPN's format, one ``CN,IPv4[,IPv6]`` line per common name
(either address may be empty), so a server moved from OpenVPN keeps its
clients' addresses.  It is read at start, remembered per CN as clients get
addresses, and rewritten every SECONDS and at exit; SECONDS 0 means read-only
(OpenVPN's meaning).  The address is only a preference: it is given when it is
still free in the pool.
"""
from __future__ import annotations

import ipaddress
import logging
import os

log = logging.getLogger("bsd_ovpn.daemon")

IPv4 = ipaddress.IPv4Address
IPv6 = ipaddress.IPv6Address
#: a damaged or hostile file must not make the daemon allocate without bound
MAX_ENTRIES = 1 << 20


def parse(text: str) -> dict[str, tuple[IPv4 | None, IPv6 | None]]:
    """CN -> (IPv4, IPv6); malformed lines are skipped (logged), as OpenVPN does."""
    out: dict[str, tuple[IPv4 | None, IPv6 | None]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(",")
        if len(parts) < 2 or not parts[0]:
            log.warning("ifconfig-pool-persist line %d: expected CN,IPv4[,IPv6]: %r", n, line)
            continue
        try:
            v4 = IPv4(parts[1]) if parts[1] else None
            v6 = IPv6(parts[2]) if len(parts) > 2 and parts[2] else None
        except ValueError as exc:
            log.warning("ifconfig-pool-persist line %d: %s", n, exc)
            continue
        if len(out) >= MAX_ENTRIES:
            log.warning("ifconfig-pool-persist: more than %d entries, rest ignored", MAX_ENTRIES)
            break
        out[parts[0]] = (v4, v6)
    return out


def render(entries: dict[str, tuple[IPv4 | None, IPv6 | None]]) -> str:
    return "".join(f"{cn},{v4 or ''}" + (f",{v6}" if v6 else "") + "\n"
                    for cn, (v4, v6) in sorted(entries.items()))


class PoolPersistence:
    """The CN -> address memory of one server (``path`` None: the directive is absent)."""

    def __init__(self, path: str | None, seconds: int = 600) -> None:
        self.path = path
        self.seconds = seconds
        self.entries: dict[str, tuple[IPv4 | None, IPv6 | None]] = {}
        self._dirty = False
        self._next_write = 0.0
        if path is not None:
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    self.entries = parse(f.read())
            except FileNotFoundError:
                pass                              # first start
            except OSError as exc:
                log.warning("ifconfig-pool-persist %s: %s", path, exc)

    def preferred(self, cn: str | None) -> tuple[IPv4 | None, IPv6 | None]:
        if self.path is None or not cn:
            return None, None
        return self.entries.get(cn, (None, None))

    def note(self, cn: str | None, v4: IPv4 | None, v6: IPv6 | None) -> None:
        """``cn`` got these pool addresses (ccd ``ifconfig-push`` ones are not noted)."""
        if self.path is None or not cn or "," in cn or "\n" in cn:
            return
        if self.entries.get(cn) != (v4, v6) and len(self.entries) < MAX_ENTRIES:
            self.entries[cn] = (v4, v6)
            self._dirty = True

    def tick(self, now: float) -> None:
        """Rewrite the file every ``seconds`` (when something changed)."""
        if self.path is None or self.seconds <= 0 or now < self._next_write:
            return
        self._next_write = now + self.seconds
        if self._dirty:
            self.write()

    def write(self) -> None:
        """Rewrite in place (works after ``user nobody`` if the file is theirs, as in OpenVPN)."""
        if self.path is None or self.seconds <= 0:
            return
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(render(self.entries))
            self._dirty = False
        except OSError as exc:
            log.warning("ifconfig-pool-persist %s: %s", self.path, exc)
