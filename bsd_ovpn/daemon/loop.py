"""Event-loop glue shared by ``ovpnctl server`` and ``ovpnctl client``.

Two small things live here:

* :class:`IfOvpnPeers` -- **the one place** where session events become
  if_ovpn calls (NEW_PEER, SET_PEER, NEW_KEY + START_VPN, SWAP_KEYS, DEL_KEY,
  DEL_PEER) and where notifications are drained.  The server and the client
  only decide *when*; the slot dance itself comes from the session's events
  (dco spec §4.4), never re-derived here.
* :class:`Loop` -- a ``selectors`` loop with deadlines, signals delivered as
  ordinary callbacks (``signal.set_wakeup_fd``), and a thread-safe
  ``call_soon`` so worker threads (auth scripts) hand results back to the
  single thread that owns the sessions.

Everything protocol-ish stays in :mod:`bsd_ovpn.proto`; everything kernel-ish
in :mod:`bsd_ovpn.interface`.
"""
from __future__ import annotations

import errno as _errno
import logging
import os
import selectors
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from bsd_ovpn.errors import IfOvpnError, OvpnError
from bsd_ovpn.ifovpn import KeySlot
from bsd_ovpn.interface import Interface, KeyMaterial, Notification, PeerStats
from bsd_ovpn.proto import events as ev

log = logging.getLogger("bsd_ovpn.daemon")

#: notifications are drained after every UDP wake-up and at least this often
DRAIN_INTERVAL = 1.0
#: Over the userspace engine a drain is a round trip to another process even when
#: the queue is empty, and nothing can wake us when it is not (the kernel wakes the
#: hooked UDP socket; the engine cannot reach into our socket).  Under load every
#: wake-up drained: with 1000 clients connecting, thousands of empty GET_PKT round
#: trips.  Notifications (keepalive timeout, ROTATE_KEY at 2**31 packets, FLOAT)
#: tolerate this much delay, so engine drains are spaced at least this far apart.
ENGINE_DRAIN_SPACING = 0.05
RECV_SIZE = 65535
#: datagrams read per wake-up before timers get a turn (fairness, not a limit)
MAX_READS_PER_WAKEUP = 256
#: GET_PEER_STATS may take at most this share of the loop's time.  With 1000 peers
#: one answer takes the userspace engine ~0.3 s to build, during which the loop
#: (waiting for it) reads nothing; a ``status FILE 1`` then starved the handshakes.
STATS_MAX_SHARE = 0.05


class DaemonError(OvpnError):
    """The daemon cannot start or continue; the message says what to fix."""


class DataChannelLost(DaemonError):
    """Our interface's data channel is gone (engine died, interface removed).

    if_ovpn state cannot be rebuilt behind the clients' backs, so the daemon
    ends with status 1 and leaves restarting to its supervisor (rc.d, systemd),
    which then starts from a clean interface.
    """


# --------------------------------------------------------------------------- if_ovpn glue

class IfOvpnPeers:
    """Session events -> if_ovpn calls on one interface, for any number of peers.

    ``sock`` is the UDP socket the control channel uses; NEW_PEER hands it to
    the kernel (or the engine), which then eats P_DATA_V2 for known peer ids.
    """

    def __init__(self, ifc: Interface, sock: Any, *, drain_spacing: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``drain_spacing``: least time between two notification drains (0: every
        call, right for the kernel, whose GET_PKT is a cheap ioctl), on ``clock``."""
        self.ifc = ifc
        self.sock = sock
        self.drain_spacing = drain_spacing
        self._clock = clock
        self._drain_next = 0.0               # clock() of the next allowed drain
        self._drain_skipped = False          # a drain was asked for before _drain_next
        self.peers: set[int] = set()
        self.keepalive: dict[int, tuple[int, int]] = {}
        self.last_stats: dict[int, PeerStats] = {}
        self._stats_next = 0.0               # time.monotonic() of the next allowed refresh

    # -- peers
    def new_peer(self, peer_id: int, remote: Any, *, vpn_ipv4: Any = None,
                 vpn_ipv6: Any = None, local: Any = None) -> None:
        """``local`` (multihome): the address the peer talks to, port 0 (the socket's)."""
        self.ifc.new_peer(peer_id, self.sock, remote, local=local, vpn_ipv4=vpn_ipv4,
                          vpn_ipv6=vpn_ipv6)
        self.peers.add(peer_id)

    def set_keepalive(self, peer_id: int, interval: int, timeout: int) -> None:
        """OVPN_SET_PEER; skipped when both are 0 (the kernel default)."""
        interval, timeout = int(interval), int(timeout)
        if peer_id not in self.peers or (interval == 0 and timeout == 0):
            return
        self.ifc.set_peer(peer_id, interval, timeout)
        self.keepalive[peer_id] = (interval, timeout)

    def del_peer(self, peer_id: int) -> None:
        """OVPN_DEL_PEER for a peer we added; ENOENT (already gone) is fine."""
        if peer_id not in self.peers:
            return
        self.peers.discard(peer_id)
        self.keepalive.pop(peer_id, None)
        try:
            self.ifc.del_peer(peer_id)
        except IfOvpnError as exc:
            if exc.errno != _errno.ENOENT:
                raise

    def forget(self, peer_id: int) -> None:
        """The kernel already deleted the peer (DEL_PEER notification)."""
        self.peers.discard(peer_id)
        self.keepalive.pop(peer_id, None)

    # -- keys: the session says which slot; we only translate
    def apply(self, peer_id: int, event: ev.Event) -> bool:
        """Turn one key event into its if_ovpn call; False if ``event`` is not a key event."""
        if isinstance(event, ev.KeysReady):
            k = event.keys
            self.ifc.new_key(peer_id, event.slot, event.key_id, k.cipher,
                             encrypt=KeyMaterial(k.encrypt_key, k.encrypt_iv),
                             decrypt=KeyMaterial(k.decrypt_key, k.decrypt_iv))
            self.ifc.start_vpn()            # as OpenVPN: after every NEW_KEY
            return True
        if isinstance(event, ev.SwapKeys):
            if peer_id in self.peers:
                self.ifc.swap_keys(peer_id)
            return True
        if isinstance(event, ev.DeleteKey):
            if peer_id in self.peers:
                self.ifc.del_key(peer_id, KeySlot(event.slot))
            return True
        return False

    # -- kernel -> us
    def drain_deadline(self) -> float | None:
        """When a skipped drain is due (on the clock), so a quiet loop still makes it."""
        return self._drain_next if self._drain_skipped else None

    def _check_lost(self, exc: Exception) -> None:
        """Raise DataChannelLost when ``exc`` means the interface cannot come back."""
        if isinstance(exc, ConnectionError):       # the engine's socket is gone
            raise DataChannelLost(f"the data channel of {self.ifc.name} is gone: {exc}") from None
        if isinstance(exc, IfOvpnError) and exc.errno == _errno.ENXIO:
            raise DataChannelLost(f"interface {self.ifc.name} is gone (removed by someone "
                                  "else)") from None

    def drain(self) -> list[Notification]:
        """Every queued notification (GET_PKT until ENOENT); [] without asking when the
        last drain was less than ``drain_spacing`` ago."""
        if self.drain_spacing:
            now = self._clock()
            if now < self._drain_next:
                self._drain_skipped = True
                return []
            self._drain_next = now + self.drain_spacing
            self._drain_skipped = False
        try:
            return self.ifc.notifications()
        except (IfOvpnError, OvpnError) as exc:
            self._check_lost(exc)
            log.warning("reading if_ovpn notifications failed: %s", exc)
            return []

    def stats(self) -> dict[int, PeerStats]:
        """GET_PEER_STATS; on failure the last answer (status must not kill the daemon).

        Refreshed at most so often that the call takes STATS_MAX_SHARE of the time
        (a few peers: every call; 1000 peers over the engine: every few seconds);
        in between the last answer is returned.
        """
        start = time.monotonic()
        if start < self._stats_next:
            return self.last_stats
        try:
            self.last_stats = self.ifc.peer_stats()
        except (IfOvpnError, OvpnError) as exc:
            self._check_lost(exc)
            log.warning("GET_PEER_STATS failed: %s", exc)
        took = time.monotonic() - start
        self._stats_next = start + took / STATS_MAX_SHARE
        return self.last_stats


# --------------------------------------------------------------------------- interface

def create_interface(transport: Any, dev: str, *, ifmode: str) -> Interface:
    """Clone the interface the way OpenVPN names it: ``dev tun`` -> first free tunN,
    any other name exactly; ``ovpn`` lets the kernel pick ovpnN."""
    if dev == "ovpn":
        return Interface.create("ovpn", ifmode=ifmode, transport=transport)
    candidates = [f"tun{n}" for n in range(256)] if dev == "tun" else [dev]
    last: Exception | None = None
    for name in candidates:
        try:
            return Interface.create("ovpn", rename_to=name, ifmode=ifmode, transport=transport)
        except IfOvpnError as exc:
            if exc.errno != _errno.EEXIST:
                raise
            last = exc
    raise DaemonError(f"cannot create interface {dev}: every name is taken ({last})")


# --------------------------------------------------------------------------- the loop

class Loop:
    """A selectors loop: readers, one deadline callback, signals, thread hand-off."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, self._drain_wakeups)
        self._soon: deque[Callable[[], None]] = deque()
        self._signals: deque[int] = deque()
        self._old_handlers: dict[int, Any] = {}
        self._old_wakeup: int | None = None
        self.stopped = False

    # -- registration
    def add_reader(self, fileobj: Any, callback: Callable[[], None]) -> None:
        self.sel.register(fileobj, selectors.EVENT_READ, callback)

    def remove_reader(self, fileobj: Any) -> None:
        try:
            self.sel.unregister(fileobj)
        except (KeyError, ValueError):
            pass

    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None:
        self._soon.append(fn)
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass

    def handle_signals(self, signums: list[int], callback: Callable[[int], None]) -> None:
        """Deliver ``signums`` to ``callback`` from the loop thread (never mid-update)."""
        self._signal_cb = callback

        def note(signum: int, _frame: Any) -> None:
            self._signals.append(signum)

        self._old_wakeup = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for s in signums:
            self._old_handlers[s] = signal.signal(s, note)

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    # -- running
    def run(self, deadline: Callable[[], float | None], on_wake: Callable[[float], None]) -> None:
        """Run until :meth:`stop`; ``on_wake(now)`` runs after every wake-up (timers,
        notifications); ``deadline()`` says when the next wake-up is due at the latest."""
        while not self.stopped:
            now = self.clock()
            d = deadline()
            timeout = DRAIN_INTERVAL if d is None else max(0.0, min(d - now, DRAIN_INTERVAL))
            if self._soon or self._signals:
                timeout = 0.0
            for key, _mask in self.sel.select(timeout):
                key.data()
            while self._signals:
                self._signal_cb(self._signals.popleft())
            while self._soon:
                self._soon.popleft()()
            on_wake(self.clock())

    def stop(self) -> None:
        self.stopped = True

    def close(self) -> None:
        for s, h in self._old_handlers.items():
            signal.signal(s, h)
        self._old_handlers.clear()
        if self._old_wakeup is not None:
            signal.set_wakeup_fd(self._old_wakeup)
            self._old_wakeup = None
        self.sel.close()
        self._wake_r.close()
        self._wake_w.close()


def read_datagrams(sock: socket.socket) -> list[tuple[bytes, Any]]:
    """Everything readable now.  EAGAIN (also the kernel's spurious wake-up that
    announces a notification) ends the batch; ICMP errors are skipped."""
    out: list[tuple[bytes, Any]] = []
    for _ in range(MAX_READS_PER_WAKEUP):
        try:
            data, addr = sock.recvfrom(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            break
        except OSError as exc:
            log.debug("recvfrom: %s", exc)       # e.g. ECONNREFUSED from an ICMP error
            continue
        out.append((data, addr))
    return out


def read_datagrams_from(sock: socket.socket, *, pktinfo: bool = False
                        ) -> list[tuple[bytes, Any, Any]]:
    """Like :func:`read_datagrams`, each with the address it was sent to
    (``pktinfo=True``: a :class:`~bsd_ovpn.daemon.pktinfo.Local`, read with
    IP_PKTINFO / IPV6_RECVPKTINFO, for multihome; else None).  IPv6 peer
    addresses come back as ``(ip, port, flowinfo, scope_id)`` with the scope only
    in ``scope_id`` (Python also writes it into the text as ``fe80::1%eth0``; the
    if_ovpn layer refuses a scope given twice)."""
    from bsd_ovpn.daemon import pktinfo as pi

    out: list[tuple[bytes, Any, Any]] = []
    for _ in range(MAX_READS_PER_WAKEUP):
        try:
            if pktinfo:
                data, addr, local = pi.recv(sock, RECV_SIZE)
            else:
                data, addr = sock.recvfrom(RECV_SIZE)
                local = None
        except (BlockingIOError, InterruptedError):
            break
        except OSError as exc:
            log.debug("recvfrom: %s", exc)       # e.g. ECONNREFUSED from an ICMP error
            continue
        if len(addr) == 4 and "%" in addr[0]:
            addr = (addr[0].split("%", 1)[0], addr[1], addr[2], addr[3])
        out.append((data, addr, local))
    return out


def drop_privileges(user: str | None, group: str | None) -> None:
    """``user``/``group`` directives: switch ids after everything privileged is set up."""
    import grp
    import pwd

    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError as exc:
            raise DaemonError(f"group {group!r} does not exist") from exc
        os.setgroups([gid])
        os.setgid(gid)
    if user:
        try:
            pw = pwd.getpwnam(user)
        except KeyError as exc:
            raise DaemonError(f"user {user!r} does not exist") from exc
        if not group:
            os.setgroups([pw.pw_gid])
            os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)
    if user or group:
        log.info("dropped privileges to user %s group %s", user or "-", group or "-")


#: gen-0 threshold of the cycle collector in a server daemon (CPython's default is 700)
SERVER_GC_THRESHOLD = 20000


def tune_gc_for_server() -> None:
    """Make the cycle collector cheap for a daemon holding thousands of sessions.

    The default collects generation 0 every 700 net allocations, and a handshake
    allocates thousands of short-lived objects (packets, records, events), none
    of them in cycles: with 1000 clients connecting, ~0.1 ms per handshake went
    to collections that found almost nothing.  Objects built at start-up
    (config, contexts, modules) are moved out of the collector's sight for good
    (gc.freeze), and generation 0 is collected every SERVER_GC_THRESHOLD
    allocations instead; collection stays on, so real cycles are still freed.
    """
    import gc
    gc.collect()
    gc.freeze()
    _, g1, g2 = gc.get_threshold()
    gc.set_threshold(SERVER_GC_THRESHOLD, g1, g2)


def thread(target: Callable[[], None], name: str) -> threading.Thread:
    t = threading.Thread(target=target, name=name, daemon=True)
    t.start()
    return t


# --------------------------------------------------------------------------- running a daemon

def serve(daemon: Any, loop: Loop, *, control: Any = None, status_file: Any = None,
          status_version: int = 1, user: str | None = None, group: str | None = None,
          shutdown_linger: float = 2.0) -> int:
    """Run ``daemon`` (ServerDaemon or ClientDaemon) on ``loop`` until it ends.

    SIGTERM/SIGINT: the daemon says goodbye on the control channel, the loop
    runs until that is acknowledged (at most ``shutdown_linger`` s), and the
    caller's ``finally`` removes the interface.  SIGHUP: reload the config.
    SIGUSR2: write the status to the log.  Returns the exit status.
    """
    import signal as _signal

    from bsd_ovpn.daemon.status import StatusFileWriter, render_text

    state: dict[str, Any] = {"deadline": None, "next_status": 0.0, "status_writer": None}

    def on_signal(signum: int) -> None:
        now = loop.clock()
        if signum in (_signal.SIGTERM, _signal.SIGINT):
            if state["deadline"] is None:
                log.info("%s: shutting down", _signal.Signals(signum).name)
                state["deadline"] = now + shutdown_linger
                daemon.begin_shutdown(now)
        elif signum == _signal.SIGHUP:
            try:
                daemon.reload_from_disk()
            except OvpnError as exc:
                log.error("SIGHUP: config not reloaded: %s", exc)
        elif signum == _signal.SIGUSR2:
            log.info("status:\n%s", render_text(daemon.status()))

    def on_wake(now: float) -> None:
        daemon.wake(now)
        if state["deadline"] is not None and (daemon.shutdown_done() or now >= state["deadline"]):
            loop.stop()
        if daemon.finished():
            loop.stop()
        if status_file is not None and now >= state["next_status"]:
            state["next_status"] = now + status_file.interval
            try:
                if state["status_writer"] is None:
                    state["status_writer"] = StatusFileWriter(status_file.path)
                state["status_writer"].write(daemon.status(), status_version)
            except OSError as exc:
                log.warning("status file %s: %s", status_file.path, exc)

    def deadline() -> float | None:
        # the status file is due on time too, not at the next wake-up after it
        d = daemon.deadline()
        if status_file is None:
            return d
        return state["next_status"] if d is None else min(d, state["next_status"])

    def handle(req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "status":
            return {"ok": True, "status": daemon.status().as_dict()}
        if cmd == "kill":
            target = req.get("target")
            if not isinstance(target, (str, int)) or isinstance(target, bool):
                raise DaemonError("kill needs a target (common name or peer id)")
            return {"ok": True, "killed": daemon.kill(str(target), loop.clock())}
        raise DaemonError(f"unknown control command {cmd!r} (status, kill)")

    if control is not None:
        control.handler = handle
        control.register(loop)
    loop.handle_signals([_signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP, _signal.SIGUSR2],
                        on_signal)
    if status_file is not None:
        try:                                  # opened as root: still writable as nobody
            state["status_writer"] = StatusFileWriter(status_file.path)
        except OSError as exc:
            log.warning("status file %s: %s", status_file.path, exc)
    try:
        drop_privileges(user, group)
        loop.run(deadline, on_wake)
    finally:
        if state["status_writer"] is not None:
            state["status_writer"].close()
    return daemon.exit_status()
