"""A load generator: N OpenVPN clients from one process tree, for server scale benchmarks.

Why it exists: "does our server keep up with stock OpenVPN at 1000 clients?"
can only be answered by something that *is* 1000 clients, cheaply.  Starting
1000 ``openvpn`` processes would measure fork/exec and tun setup, not the
server.  So every simulated client here is just our sans-IO
:class:`~bsd_ovpn.proto.session.Session` plus one connected UDP socket (its
own source port, source addresses spread over those the caller added to the
namespace), all driven by a single ``epoll`` loop per worker process.  No tun
device: the data channel is only used for keepalive pings, encrypted with the
negotiated keys (:class:`~bsd_ovpn.proto.datachannel.DataChannel`) and
decrypted on receipt, which proves each client's keys really work.

Each client does what a real one does: hard reset, TLS handshake, key-method
2, PUSH_REQUEST/PUSH_REPLY (the Session announces IV_PROTO_REQUEST_PUSH, so a
2.6 server pushes right after the key exchange; PUSH_REQUEST goes out only if
no reply came within 1 s), keys; then idles with keepalives.  Timestamps
(``time.monotonic()``, CLOCK_MONOTONIC, comparable across processes) are taken
when the client sends its first reset and when its first data-channel keys are
ready (i.e. after the PUSH_REPLY), so latency = what a user waits for.

Worker processes: Python spends a few milliseconds of CPU per client
handshake, so one process may be slower than the server it measures; the
clients are then split over ``workers`` forked processes, each with its own
loop.  ``netns`` (Linux) moves the workers into a network namespace with
``setns(2)`` before they open sockets, so the parent may stay outside.
The parent only orchestrates (:class:`LoadGenerator`): ``connect()``,
``rekey_all()``, ``idle()``, ``close()``; it is free to sample the server's
RSS meanwhile because the workers keep answering timers on their own.

Usage::

    plan = LoadPlan(remote=("192.0.2.1", 1194), clients=[ClientSpec(tls, "192.0.2.10"), ...],
                    wrap_factory=lambda: TLSCrypt(key, server=False))
    with LoadGenerator(plan, workers=2, netns="/run/netns/<client ns>") as gen:
        res = gen.connect(timeout=120)
        print(res.summary())
        rk = gen.rekey_all(timeout=120)
"""
from __future__ import annotations

import gc
import heapq
import math
import multiprocessing
import os
import resource
import selectors
import signal
import socket
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bsd_ovpn.errors import OvpnError, ValidationError
from bsd_ovpn.ifovpn import PING_MAGIC
from bsd_ovpn.proto import events as ev
from bsd_ovpn.proto.datachannel import DataChannel, DataChannelError, P_DATA_V1, P_DATA_V2
from bsd_ovpn.proto.session import Session, SessionSettings
from bsd_ovpn.proto.tls import TLSConfig

_RECV_SIZE = 65535
#: During a burst of starts (or rekeys), replies are read at most this often.
#: Reading them after every few starts made the offered load follow the server
#: under test: the faster its replies came, the more of the burst's time went
#: to answering them and the later the last clients started, so "all at once"
#: meant anything from 1 to 4 s.  Timed reads keep the burst as fast as the
#: generator can make it for every server, and still read the sockets long
#: before any retransmission timer.
_BURST_READ_INTERVAL = 0.05
_MAX_CLIENTS = 100_000
_CLONE_NEWNET = 0x40000000
# Young-generation threshold of the cyclic GC inside a worker (CPython's default is 700).
# See _quiet_gc(): with 700 a worker ran ~40 collections (one a full one over every
# live session) in a 1000-client connect burst, ~5% of its CPU, for garbage that
# is almost all freed by reference counting anyway.
_GC_THRESHOLD0 = 200_000


class LoadGenError(OvpnError):
    """The generator could not run (bad plan, worker died, socket limits)."""


# --------------------------------------------------------------------------- plan


@dataclass
class ClientSpec:
    """One simulated client: its TLS identity and the local address it binds to."""

    tls: TLSConfig
    source: str = "0.0.0.0"


@dataclass
class LoadPlan:
    """Everything the workers need; inherited by fork, never pickled.

    ``settings_factory(spec)`` may override the client :class:`SessionSettings`
    (default: AES-256-GCM, no time-based renegotiation -- the benchmark
    triggers rekeys itself -- keepalive from the server's push).
    ``start_rate`` is clients started per second over all workers (None: all
    at once); the i-th client starts at ``t0 + i / start_rate``.
    """

    remote: tuple[str, int]
    clients: Sequence[ClientSpec]
    wrap_factory: Callable[[], Any]
    data_ciphers: tuple[str, ...] = ("AES-256-GCM",)
    start_rate: float | None = None
    hand_window: float = 60.0
    settings_factory: Callable[[ClientSpec], SessionSettings] | None = None

    def validate(self) -> None:
        n = len(self.clients)
        if not 1 <= n <= _MAX_CLIENTS:
            raise ValidationError(f"load plan: 1..{_MAX_CLIENTS} clients, got {n}")
        host, port = self.remote
        if not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValidationError(f"load plan: remote port must be 1..65535, got {port!r}")
        if self.start_rate is not None and not (self.start_rate > 0 and math.isfinite(
                self.start_rate)):
            raise ValidationError(f"load plan: start_rate must be > 0 or None, "
                                  f"got {self.start_rate!r}")
        if not self.hand_window > 0:
            raise ValidationError(f"load plan: hand_window must be > 0, got {self.hand_window}")

    def settings_for(self, spec: ClientSpec) -> SessionSettings:
        if self.settings_factory is not None:
            return self.settings_factory(spec)
        return SessionSettings(server=False, tls=spec.tls, data_ciphers=self.data_ciphers,
                               hand_window=self.hand_window, reneg_sec=0.0)


# --------------------------------------------------------------------------- results


@dataclass
class ClientRecord:
    """Per-client figures a worker reports (times are time.monotonic())."""

    index: int
    local: tuple[Any, ...] | None = None
    started: float | None = None
    connected: float | None = None
    peer_id: int | None = None
    failed: str | None = None          # ConnectionTerminated reason: message
    rekey_started: float | None = None
    rekey_done: float | None = None
    rekey_key_id: int | None = None
    pings_sent: int = 0
    data_received: int = 0
    data_errors: int = 0               # data packets that failed to decrypt on a known key
    last_data_error: str | None = None
    early_data: int = 0                # data packets for a key_id we have no keys for (yet)
    early_data_at: float | None = None
    new_key_data: int = 0              # data packets received on the rekeyed key_id
    control_dropped: int = 0
    pushed: tuple[str, ...] = ()


def _percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (no interpolation: a value that was measured)."""
    if not sorted_values:
        return math.nan
    k = max(0, min(len(sorted_values) - 1, math.ceil(p / 100.0 * len(sorted_values)) - 1))
    return sorted_values[k]


@dataclass
class PhaseResult:
    """Figures of one phase (connect or rekey) over every client."""

    phase: str
    total: int
    done: int
    failed: int
    t0: float
    wall: float                         # first start .. last completion (s)
    latencies: list[float] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Completions per second over the whole phase."""
        return self.done / self.wall if self.wall > 0 else math.nan

    @property
    def all_done(self) -> bool:
        return self.done == self.total

    def percentile(self, p: float) -> float:
        return _percentile(sorted(self.latencies), p)

    @property
    def p50(self) -> float:
        return self.percentile(50)

    @property
    def p99(self) -> float:
        return self.percentile(99)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.latencies) if self.latencies else math.nan

    def summary(self) -> str:
        return (f"{self.phase}: {self.done}/{self.total} in {self.wall:.3f} s "
                f"({self.rate:.1f}/s), latency p50 {self.p50 * 1000:.1f} ms "
                f"p99 {self.p99 * 1000:.1f} ms max "
                f"{(max(self.latencies) if self.latencies else math.nan) * 1000:.1f} ms, "
                f"failed {self.failed} {self.failures or ''}")


def phase_result(phase: str, records: Sequence[ClientRecord]) -> PhaseResult:
    """Aggregate per-client records into one phase's figures."""
    if phase == "connect":
        pairs = [(r.started, r.connected) for r in records]
    elif phase == "rekey":
        # only clients that were connected when the rekey started take part
        records = [r for r in records if r.rekey_started is not None]
        pairs = [(r.rekey_started, r.rekey_done) for r in records]
    else:
        raise ValidationError(f"phase must be connect or rekey, got {phase!r}")
    starts = [s for s, _ in pairs if s is not None]
    ends = [e for _, e in pairs if e is not None]
    lat = [e - s for s, e in pairs if s is not None and e is not None]
    t0 = min(starts) if starts else math.nan
    wall = (max(ends) - t0) if ends and starts else math.nan
    failures: dict[str, int] = {}
    for r in records:
        if r.failed is not None:
            key = r.failed.split(":", 1)[0]
            failures[key] = failures.get(key, 0) + 1
    return PhaseResult(phase, len(records), len(lat), sum(1 for r in records if r.failed),
                       t0, wall, lat, failures)


# --------------------------------------------------------------------------- worker


class _Client:
    __slots__ = ("rec", "spec", "sock", "session", "timer", "dcs", "tx_key_id", "settings",
                 "wrap")

    def __init__(self, rec: ClientRecord, spec: ClientSpec) -> None:
        self.rec = rec
        self.spec = spec
        self.sock: socket.socket | None = None
        self.session: Session | None = None
        # built before the connect phase (open_sockets), used once by _start
        self.settings: SessionSettings | None = None
        self.wrap: Any = None
        self.timer: float | None = None
        self.dcs: dict[int, DataChannel] = {}
        self.tx_key_id: int | None = None


class _Worker:
    """One epoll loop over a slice of the clients (runs in a forked process)."""

    def __init__(self, plan: LoadPlan, indices: Sequence[int], clock: Callable[[], float]
                 = time.monotonic) -> None:
        self.plan = plan
        self.clock = clock
        self.clients = [_Client(ClientRecord(i), plan.clients[i]) for i in indices]
        self.sel = selectors.EpollSelector() if hasattr(selectors, "EpollSelector") \
            else selectors.DefaultSelector()
        self.heap: list[tuple[float, int, _Client]] = []
        self._seq = 0
        self.pending_starts: list[tuple[float, _Client]] = []
        self.phase: str | None = None
        self.phase_deadline = 0.0
        self._family = socket.AF_INET6 if ":" in plan.remote[0] else socket.AF_INET

    # -- setup ---------------------------------------------------------------
    def open_sockets(self) -> None:
        need = len(self.clients) + 64
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < need:
            want = need if hard == resource.RLIM_INFINITY else min(need, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            if want < need:
                raise LoadGenError(f"need {need} file descriptors, the hard limit is {hard}")
        for c in self.clients:
            s = socket.socket(self._family, socket.SOCK_DGRAM)
            try:
                s.bind((c.spec.source, 0))
                s.connect(self.plan.remote)
            except OSError as exc:
                s.close()
                raise LoadGenError(f"client {c.rec.index}: cannot bind {c.spec.source} / "
                                   f"connect {self.plan.remote}: {exc}") from exc
            s.setblocking(False)
            c.sock = s
            c.rec.local = s.getsockname()
            self.sel.register(s, selectors.EVENT_READ, c)
        # build the SSL contexts, session settings and control-channel wraps now,
        # outside the measured time: the connect burst should cost the generator
        # only what each client does on the wire
        for c in self.clients:
            c.spec.tls.context(False)
            c.settings = self.plan.settings_for(c.spec)
            c.wrap = self.plan.wrap_factory()

    def close(self) -> None:
        for c in self.clients:
            if c.sock is not None:
                try:
                    self.sel.unregister(c.sock)
                except (KeyError, ValueError):
                    pass
                c.sock.close()
                c.sock = None
        self.sel.close()

    # -- timers --------------------------------------------------------------
    def next_deadline(self) -> float | None:
        h = self.heap
        while h and h[0][2].timer != h[0][0]:
            heapq.heappop(h)
        times = []
        if h:
            times.append(h[0][0])
        if self.pending_starts:
            times.append(self.pending_starts[-1][0])
        return min(times) if times else None

    # -- actions -------------------------------------------------------------
    def schedule_connect(self, t0: float) -> None:
        rate = self.plan.start_rate
        starts = [(t0 + (c.rec.index / rate if rate else 0.0), c) for c in self.clients]
        starts.sort(key=lambda x: x[0], reverse=True)     # pop() from the end = earliest
        self.pending_starts = starts
        self.phase = "connect"

    def _start(self, c: _Client, now: float) -> None:
        settings = c.settings if c.settings is not None else self.plan.settings_for(c.spec)
        wrap = c.wrap if c.wrap is not None else self.plan.wrap_factory()
        c.settings = c.wrap = None
        c.session = Session.connect(settings, wrap, now)
        c.rec.started = now
        self._service(c, now)

    def rekey_all(self) -> None:
        now = self.clock()
        read_at = now + _BURST_READ_INTERVAL
        for c in self.clients:
            s = c.session
            if s is None or s.terminated is not None or c.rec.connected is None:
                continue
            try:
                s.renegotiate(now)
            except OvpnError as exc:
                c.rec.failed = f"rekey: {exc}"
                continue
            assert s.primary is not None
            c.rec.rekey_key_id = s.primary.key_id
            c.rec.rekey_started = now
            c.rec.rekey_done = None
            c.rec.new_key_data = 0
            self._service(c, now)
            now = self.clock()
            if now >= read_at:              # keep answering the server during the burst
                self._drain_ready()
                read_at = self.clock() + _BURST_READ_INTERVAL
        self.phase = "rekey"

    def close_all(self, linger: float) -> None:
        now = self.clock()
        for c in self.clients:
            if c.session is not None and c.session.terminated is None:
                c.session.close(now, linger=linger)
                self._service(c, now)

    # -- the loop ------------------------------------------------------------
    def _send(self, c: _Client, data: bytes) -> None:
        try:
            c.sock.send(data)  # type: ignore[union-attr]
        except (BlockingIOError, ConnectionRefusedError, OSError):
            pass            # lost datagram: the reliability layer retransmits

    def _service(self, c: _Client, now: float) -> None:
        """Run due timers, send what is queued, take events, re-arm the client's timer."""
        s = c.session
        if s is None:
            return
        t = s.get_timer()
        for _ in range(8):
            if t is not None and t <= now:
                s.handle_timer(now)
            for d in s.datagrams_to_send(now):
                self._send(c, d)
            while (e := s.next_event()) is not None:
                self._event(c, e, now)
            t = s.get_timer()
            if t is None or t > now:
                break
        c.timer = t
        if t is not None:
            self._seq += 1
            heapq.heappush(self.heap, (t, self._seq, c))

    def _event(self, c: _Client, e: ev.Event, now: float) -> None:
        rec = c.rec
        s = c.session
        assert s is not None
        if isinstance(e, ev.KeysReady):
            pid = s.peer_id if s.peer_id is not None else e.peer_id
            c.dcs[e.key_id] = DataChannel(e.keys, peer_id=pid)
            if c.tx_key_id is None:
                c.tx_key_id = e.key_id
            if rec.connected is None and e.key_id == 0:
                rec.connected = now
                rec.peer_id = s.peer_id
            elif rec.rekey_key_id == e.key_id and rec.rekey_done is None:
                rec.rekey_done = now
        elif isinstance(e, ev.SwapKeys):
            c.tx_key_id = e.key_id
        elif isinstance(e, ev.DeleteKey):
            c.dcs.pop(e.key_id, None)
            if c.tx_key_id == e.key_id:
                c.tx_key_id = next(iter(c.dcs), None)
        elif isinstance(e, ev.SendPing):
            tx = s.tx_keys()
            dc = c.dcs.get(tx.key_id) if tx is not None else None
            if dc is not None:
                self._send(c, dc.encrypt(PING_MAGIC))
                rec.pings_sent += 1
        elif isinstance(e, ev.PushReplyReceived):
            rec.pushed = tuple(e.raw)
        elif isinstance(e, ev.ConnectionTerminated):
            if rec.failed is None:
                rec.failed = f"{e.reason}: {e.message}"

    def _receive(self, c: _Client, now: float) -> None:
        sock = c.sock
        s = c.session
        if sock is None:
            return
        got = False
        while True:
            try:
                data = sock.recv(_RECV_SIZE)
            except BlockingIOError:
                break
            except OSError:
                break           # ICMP error from an earlier send
            if s is None or not data:
                continue
            op = data[0] >> 3
            if op == P_DATA_V2 or op == P_DATA_V1:
                dc = c.dcs.get(data[0] & 7)
                if dc is None:
                    # the server may send before our keys exist (its pings start as soon as
                    # it has keys, our PUSH_REPLY may still be in a retransmission): a
                    # real client drops these too
                    c.rec.early_data += 1
                    if c.rec.early_data_at is None:
                        c.rec.early_data_at = now
                    continue
                try:
                    dc.decrypt(data, now)
                except DataChannelError as exc:
                    c.rec.data_errors += 1
                    c.rec.last_data_error = f"{type(exc).__name__}: {exc}"
                    continue
                c.rec.data_received += 1
                if dc.key_id == c.rec.rekey_key_id:
                    c.rec.new_key_data += 1
                s.data_received(now)
            else:
                if not s.receive_datagram(data, now):
                    c.rec.control_dropped += 1
                # keys must be in place before a data packet later in this batch
                while (e := s.next_event()) is not None:
                    self._event(c, e, now)
            got = True
        if got and s is not None:
            self._service(c, now)

    def _drain_ready(self) -> None:
        """Read every socket that has datagrams now (no waiting)."""
        for key, _mask in self.sel.select(0):
            if isinstance(key.data, _Client):
                self._receive(key.data, self.clock())

    def poll(self, max_wait: float) -> None:
        """One loop iteration: wait for I/O or the next timer, then handle what is due."""
        now = self.clock()
        d = self.next_deadline()
        wait = max_wait if d is None else max(0.0, min(max_wait, d - now))
        for key, _mask in self.sel.select(wait):
            c = key.data
            if isinstance(c, _Client):
                self._receive(c, self.clock())
        now = self.clock()
        read_at = now + _BURST_READ_INTERVAL
        while self.pending_starts and self.pending_starts[-1][0] <= now:
            _, c = self.pending_starts.pop()
            self._start(c, now)
            now = self.clock()
            # keep answering the server while a burst of starts goes out
            if now >= read_at:
                self._drain_ready()
                read_at = self.clock() + _BURST_READ_INTERVAL
        h = self.heap
        due: list[_Client] = []
        while h:
            t, _, c = h[0]
            if c.timer != t:
                heapq.heappop(h)
                continue
            if t > now:
                break
            heapq.heappop(h)
            c.timer = None
            due.append(c)
        # serviced after collecting: a session that stays due is re-armed and
        # handled on the next poll (select timeout 0), never spun on here
        for c in due:
            self._service(c, now)

    def phase_complete(self) -> bool:
        if self.phase == "connect":
            return not self.pending_starts and all(
                c.rec.connected is not None or c.rec.failed is not None for c in self.clients)
        if self.phase == "rekey":
            return all(c.rec.rekey_done is not None or c.rec.failed is not None
                       or c.rec.rekey_started is None for c in self.clients)
        if self.phase == "close":
            return all(c.session is None or c.session.terminated is not None
                       for c in self.clients)
        return False            # idle: only the deadline ends it

    def records(self) -> list[ClientRecord]:
        for c in self.clients:
            if c.session is not None:
                c.rec.control_dropped = max(c.rec.control_dropped, c.session.dropped)
        return [c.rec for c in self.clients]

    def run(self, conn: Any) -> None:
        """Serve commands from the parent until ``close`` (the worker's main)."""
        self.sel.register(conn.fileno(), selectors.EVENT_READ, None)
        waiting = False
        while True:
            self.poll(0.2)
            if waiting and (self.phase_complete() or self.clock() >= self.phase_deadline):
                conn.send(("done", self.phase, self.records()))
                waiting = False
                if self.phase == "close":
                    return
            while conn.poll():
                cmd, *args = conn.recv()
                if cmd == "connect":
                    t0, timeout = args
                    self.schedule_connect(t0)
                    self.phase_deadline = t0 + timeout
                    waiting = True
                elif cmd == "rekey":
                    (timeout,) = args
                    self.rekey_all()
                    self.phase_deadline = self.clock() + timeout
                    waiting = True
                elif cmd == "idle":
                    (seconds,) = args
                    self.phase = "idle"
                    self.phase_deadline = self.clock() + seconds
                    waiting = True
                elif cmd == "records":
                    conn.send(("records", self.phase, self.records()))
                elif cmd == "close":
                    (linger,) = args
                    self.close_all(linger)
                    self.phase = "close"
                    self.phase_deadline = self.clock() + linger + 0.5
                    waiting = True
                else:
                    conn.send(("error", f"unknown command {cmd!r}"))


def _quiet_gc() -> None:
    """Make the cyclic garbage collector nearly free for the rest of a worker's life.

    Why: the generator is an instrument sharing the CPUs with the server it
    measures, so its own overhead distorts the figures.  A handshake allocates
    thousands of short-lived container objects (ControlPackets, events, dicts),
    which trip CPython's young-generation threshold (700) every few clients;
    every tenth young collection goes a generation up and eventually a full
    collection walks every live session, SSL context and certificate.  The
    protocol objects free themselves by reference counting (TLSChannel keeps
    only a weak reference to itself in OpenSSL), so those collections find
    next to nothing.  Freezing what setup built (contexts, certificates,
    records: never garbage) takes it out of every later collection, and a high
    young threshold makes collections rare; cycles that do form are still
    collected, only later.
    """
    gc.collect()
    gc.freeze()
    _, t1, t2 = gc.get_threshold()
    gc.set_threshold(_GC_THRESHOLD0, t1, t2)


def enter_netns(path: str) -> None:
    """Move the calling process (a fresh worker) into the network namespace at ``path``.

    Linux only (``setns(2)`` through libc: Python 3.11 has no os.setns).
    """
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise LoadGenError(f"setns({path}) failed: {os.strerror(err)}")
    finally:
        os.close(fd)


def _worker_main(plan: LoadPlan, indices: Sequence[int], conn: Any, netns: str | None) -> None:
    # the parent may have installed cleanup handlers (testbed Lab): they are not ours
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    w = _Worker(plan, indices)
    try:
        if netns is not None:
            enter_netns(netns)
        w.open_sockets()
        _quiet_gc()
        conn.send(("ready", len(indices)))
        w.run(conn)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, then exit
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        except OSError:
            pass
    finally:
        w.close()
        conn.close()


# --------------------------------------------------------------------------- parent


class LoadGenerator:
    """Runs the plan in ``workers`` forked processes and collects their records.

    The parent never touches a socket of a simulated client; it sends phase
    commands and merges the workers' per-client records (ordered by index).
    """

    def __init__(self, plan: LoadPlan, *, workers: int = 1, netns: str | None = None,
                 cpu_affinity: Sequence[int] | None = None) -> None:
        plan.validate()
        n = len(plan.clients)
        if not 1 <= workers <= min(64, n):
            raise ValidationError(f"workers must be 1..{min(64, n)}, got {workers}")
        self.plan = plan
        self.workers = workers
        self.cpu_affinity = cpu_affinity
        self.netns = netns
        self._procs: list[Any] = []
        self._conns: list[Any] = []
        self.records: list[ClientRecord] = []

    def __enter__(self) -> LoadGenerator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def start(self, timeout: float = 60.0) -> None:
        """Fork the workers; each opens its sockets and builds its SSL contexts."""
        ctx = multiprocessing.get_context("fork")
        n = len(self.plan.clients)
        for w in range(self.workers):
            indices = list(range(w, n, self.workers))
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker_main, args=(self.plan, indices, child, self.netns),
                            name=f"loadgen-{w}", daemon=True)
            p.start()
            child.close()
            if self.cpu_affinity is not None:
                try:
                    os.sched_setaffinity(p.pid, self.cpu_affinity)
                except OSError:
                    pass
            self._procs.append(p)
            self._conns.append(parent)
        for conn in self._conns:
            self._expect(conn, "ready", timeout)

    def _expect(self, conn: Any, what: str, timeout: float) -> Any:
        if not conn.poll(timeout):
            raise LoadGenError(f"a load generator worker did not answer ({what}) "
                               f"within {timeout:g} s")
        try:
            msg = conn.recv()
        except EOFError:
            raise LoadGenError(f"a load generator worker died (waiting for {what})") from None
        if msg[0] == "error":
            raise LoadGenError(f"load generator worker failed: {msg[1]}")
        if msg[0] != what:
            raise LoadGenError(f"load generator worker answered {msg[0]!r}, expected {what!r}")
        return msg

    def _phase(self, command: tuple[Any, ...], timeout: float) -> list[ClientRecord]:
        for conn in self._conns:
            conn.send(command)
        recs: list[ClientRecord] = []
        for conn in self._conns:
            msg = self._expect(conn, "done", timeout + 30.0)
            recs.extend(msg[2])
        recs.sort(key=lambda r: r.index)
        self.records = recs
        return recs

    def connect(self, timeout: float = 120.0, *, delay: float = 0.2) -> PhaseResult:
        """Start every client (all workers share one t0) and wait until all connected."""
        t0 = time.monotonic() + delay
        return phase_result("connect", self._phase(("connect", t0, timeout), timeout + delay))

    def rekey_all(self, timeout: float = 120.0) -> PhaseResult:
        """Renegotiate every connected client at once; wait for all new keys."""
        return phase_result("rekey", self._phase(("rekey", timeout), timeout))

    def idle(self, seconds: float) -> list[ClientRecord]:
        """Keep the clients idling (keepalives) for ``seconds``; return fresh records."""
        return self._phase(("idle", seconds), seconds)

    def snapshot(self) -> list[ClientRecord]:
        recs: list[ClientRecord] = []
        for conn in self._conns:
            conn.send(("records",))
        for conn in self._conns:
            recs.extend(self._expect(conn, "records", 30.0)[2])
        recs.sort(key=lambda r: r.index)
        self.records = recs
        return recs

    def close(self, linger: float = 2.0) -> list[ClientRecord]:
        """Send EXIT from every client (stock servers free the slot at once), then stop."""
        recs = self._phase(("close", linger), linger + 1.0)
        self.terminate()
        return recs

    def terminate(self) -> None:
        for conn in self._conns:
            conn.close()
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self._procs.clear()
        self._conns.clear()
