"""``ovpnctl client -c FILE``: an OpenVPN client on if_ovpn (dco spec §4.3).

The control channel is a client :class:`~bsd_ovpn.proto.session.Session`;
after its PUSH_REPLY and first keys the interface is created and the kernel
(or engine) gets the peer: NEW_PEER (pushed peer-id, our UDP socket, the
server), NEW_KEY + START_VPN, SET_PEER (pushed ping / ping-restart), then
addresses and routes.  When the session ends -- the server's RESTART or EXIT,
a kernel keepalive timeout (DEL_PEER/TIMEOUT = ping-restart), a failed
handshake -- everything is torn down and the next remote is tried after
connect-retry's back-off.  AUTH_FAILED and HALT end the daemon.

:class:`ClientDaemon` gets its socket factory, transport and network
configurator from the caller so unit tests can drive it in memory.
"""
from __future__ import annotations

import ipaddress
import os
import random
import socket
import time
from collections.abc import Callable
from typing import Any

from bsd_ovpn import config as configmod
from bsd_ovpn.errors import ConfigError, LocalProtocolError, OvpnError
from bsd_ovpn.ifovpn import DelReason
from bsd_ovpn.interface import Interface, PeerDeleted, RotateKey
from bsd_ovpn.proto import events as ev
from bsd_ovpn.proto.push import PushReply
from bsd_ovpn.proto.session import Session, SessionSettings
from bsd_ovpn.settings import client_settings_from
from bsd_ovpn.daemon.control import ClientStatus, DaemonStatus, format_addr
from bsd_ovpn.daemon.loop import DaemonError, IfOvpnPeers, create_interface, log
from bsd_ovpn.daemon.netcfg import NetConfig

Addr = Any
EXIT_LINGER = 2.0


def client_settings(cfg: configmod.Config) -> SessionSettings:
    """Session settings of a client config; keepalive is the kernel's, not the session's."""
    s = client_settings_from(cfg)
    s.ping = 0.0
    s.ping_restart = 0.0
    return s


def check_client_config(cfg: configmod.Config) -> None:
    def err(directive: str, msg: str) -> ConfigError:
        path, line = cfg.origins.get(directive, (cfg.path, None))
        return ConfigError(msg, path, line, directive)

    if cfg.is_server or not cfg.tls_client:
        raise err("client", "ovpnctl client needs a client config ('client' or 'tls-client' "
                  "+ 'pull')")
    if not cfg.pull:
        raise err("pull", "ovpnctl client needs 'pull' (peer-id and addresses are pushed)")
    if not cfg.remotes:
        raise err("remote", "no 'remote' given")
    udp = [r for r in cfg.remotes if r.proto.startswith("udp")]
    if not udp:
        raise err("remote", "if_ovpn carries UDP only and every remote is TCP")
    if cfg.dev_type != "tun":
        raise err("dev", f"dev {cfg.dev}: if_ovpn is a tun (layer 3) device")
    if cfg.allow_compression not in ("no",):
        raise err("allow-compression", "if_ovpn cannot compress; use 'allow-compression no'")
    a = cfg.auth_user_pass
    if a is not None and (a.username is None or a.password is None):
        raise err("auth-user-pass", "ovpnctl client cannot prompt: give auth-user-pass a file "
                  "with the username and the password on two lines")


def _resolve(host: str, port: int, proto: str) -> tuple[int, Addr]:
    fam = {"udp4": socket.AF_INET, "udp6": socket.AF_INET6}.get(proto, socket.AF_UNSPEC)
    try:
        infos = socket.getaddrinfo(host, port, fam, socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise DaemonError(f"cannot resolve {host}: {exc.strerror}") from exc
    family, _t, _p, _c, sockaddr = infos[0]
    return family, sockaddr


class ClientDaemon:
    """One client connection with reconnects: session events <-> if_ovpn."""

    def __init__(self, cfg: configmod.Config, *, transport: Any,
                 open_socket: Callable[[int], Any],
                 send: Callable[[Any, bytes, Addr], None] | None = None,
                 netcfg: Any = None, engine: str = "kernel",
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time,
                 resolve: Callable[[str, int, str], tuple[int, Addr]] = _resolve) -> None:
        check_client_config(cfg)
        self.cfg = cfg
        self.transport = transport
        self.open_socket = open_socket
        self.send = send or (lambda sock, data, addr: sock.sendto(data, addr))
        self.netcfg = netcfg if netcfg is not None else NetConfig()
        self.engine = engine
        self.clock = clock
        self.wall = wall
        self.resolve = resolve
        self.settings = client_settings(cfg)
        self.remotes = [r for r in cfg.remotes if r.proto.startswith("udp")]
        if cfg.remote_random:
            random.shuffle(self.remotes)
        self.remote_index = -1
        self.attempts = 0                   # failed attempts since the last success
        self.sock: Any = None
        self.remote: Addr = None
        self.session: Session | None = None
        self.ifc: Interface | None = None
        #: stale.InterfaceLedger: records the interface we create (crash cleanup)
        self.ledger: Any = None
        self.dc: IfOvpnPeers | None = None
        self.peer_id: int | None = None
        self.pushed: PushReply | None = None
        self.pending_keys: list[ev.KeysReady] = []
        self.state = "connecting"
        self.started = wall()
        self.connected_since: float | None = None
        self.last_handshake: float | None = None
        self.key_id: int | None = None
        self.cipher: str | None = None
        self.retry_at: float | None = None
        self.stopping = False
        self._finished = False
        self._exit_status = 0
        self._restart_reason: str | None = None

    # ------------------------------------------------------------------ connecting
    def start(self, now: float) -> None:
        """Next remote, fresh session (the hard reset goes out with the next pump)."""
        self.retry_at = None
        self.remote_index = (self.remote_index + 1) % len(self.remotes)
        r = self.remotes[self.remote_index]
        try:
            family, self.remote = self.resolve(r.host, self.cfg.rport or r.port, r.proto)
        except DaemonError as exc:
            log.warning("%s", exc)
            self._schedule_retry(now)
            return
        if self.sock is None or self.sock.family != family:
            if self.sock is not None:
                self.sock.close()
            self.sock = self.open_socket(family)
        self.session = Session.connect(self.settings, self.cfg.new_control_wrap(), now)
        self.state = "connecting"
        log.info("connecting to %s (%s)", format_addr(self.remote), r.host)
        self.pump(now)

    def _schedule_retry(self, now: float) -> None:
        self.attempts += 1
        if self.cfg.connect_retry_max is not None and self.attempts >= \
                self.cfg.connect_retry_max * len(self.remotes):
            log.error("giving up after %d connection attempts (connect-retry-max)", self.attempts)
            self._finish(1)
            return
        rounds = max(0, (self.attempts - 1) // len(self.remotes))
        delay = min(float(self.cfg.connect_retry) * (2 ** min(rounds, 16)),
                    float(self.cfg.connect_retry_max_interval))
        self.retry_at = now + delay
        self.state = "reconnecting"
        log.info("reconnecting in %g s", delay)

    # ------------------------------------------------------------------ driving
    def datagram_received(self, data: bytes, addr: Addr, now: float) -> None:
        s = self.session
        if s is None or self.remote is None or (addr[0], addr[1]) != (self.remote[0],
                                                                     self.remote[1]):
            return                          # not from our server: ignore, as OpenVPN does
        # P_DATA before NEW_PEER (a server keepalive) is refused and counted by the
        # session itself; an acked EXIT makes get_timer() due now, so wake() ends it.
        s.receive_datagram(data, now)
        self.pump(now)

    def deadline(self) -> float | None:
        times = [t for t in (self.retry_at,
                             self.session.get_timer() if self.session is not None else None)
                 if t is not None]
        return min(times) if times else None

    def wake(self, now: float) -> None:
        if self.retry_at is not None and now >= self.retry_at and not self.stopping:
            self.start(now)
        s = self.session
        if s is not None:
            t = s.get_timer()
            if t is not None and t <= now:
                s.handle_timer(now)
        self.handle_notifications(now)
        self.pump(now)

    def pump(self, now: float) -> None:
        for _ in range(1000):
            s = self.session
            if s is None:
                return
            n = 0
            while (e := s.next_event()) is not None:
                n += 1
                try:
                    self._on_event(s, e, now)
                except (OvpnError, OSError) as exc:
                    log.error("setting up the tunnel failed: %s", exc)
                    self._restart_reason = "tunnel setup failed"
                    if s.terminated is None:
                        s.close(now, linger=0.0)
                        s.handle_timer(now)
            if self.session is not s:
                continue
            out = s.datagrams_to_send(now)
            for data in out:
                try:
                    self.send(self.sock, data, self.remote)
                except OSError as exc:
                    log.debug("sendto %s: %s", format_addr(self.remote), exc)
            if not n and not out:
                return

    # ------------------------------------------------------------------ events -> actions
    def _on_event(self, s: Session, e: ev.Event, now: float) -> None:
        if isinstance(e, ev.PushReplyReceived):
            self.pushed = e.reply
            s.ping = s.ping_restart = 0.0     # the kernel runs the keepalive
            log.info("PUSH_REPLY: %s", ",".join(e.raw))
        elif isinstance(e, ev.KeysReady):
            self.last_handshake = self.wall()
            self.cipher = e.keys.cipher
            if self.dc is None or self.peer_id not in self.dc.peers:
                self.pending_keys.append(e)
                self._bring_up(s, now)
            else:
                self.dc.apply(self.peer_id, e)
        elif isinstance(e, (ev.SwapKeys, ev.DeleteKey)):
            if isinstance(e, ev.SwapKeys):
                self.key_id = e.key_id
            if self.dc is not None and self.peer_id is not None and s.terminated is None:
                self.dc.apply(self.peer_id, e)
        elif isinstance(e, ev.AuthFailed):
            log.error("AUTH_FAILED: %s", e.reason)
            if self.cfg.auth_retry == "none":
                self._finish(1)
        elif isinstance(e, ev.HaltReceived):
            log.error("server sent HALT %s", e.message)
            self._finish(1)
        elif isinstance(e, ev.RestartReceived):
            log.info("server sent RESTART %s", e.message)
        elif isinstance(e, ev.InfoReceived):
            log.info("server %s: %s", e.kind, e.text)
        elif isinstance(e, ev.ConnectionTerminated):
            self._ack_goodbye(s, e, now)
            self._ended(e, now)

    def _ack_goodbye(self, s: Session, e: ev.ConnectionTerminated, now: float) -> None:
        """Acknowledge the server's RESTART/EXIT/HALT before forgetting the session.

        Stock clients restart without it and the server gives up after a short
        linger; the ACK lets it forget us (and DEL_PEER) at once instead.
        """
        if e.reason not in ("restart", "exit", "halt") or self.sock is None \
                or self.remote is None:
            return
        for data in s.datagrams_to_send(now):
            try:
                self.send(self.sock, data, self.remote)
            except OSError as exc:
                log.debug("sendto %s: %s", format_addr(self.remote), exc)

    def _bring_up(self, s: Session, now: float) -> None:
        """After PUSH_REPLY + first keys: dco spec §4.3, in OpenVPN's order."""
        if self.pushed is None:
            return                          # keys before PUSH_REPLY: wait for it
        reply = self.pushed
        peer_id = reply.peer_id if reply.peer_id is not None else s.peer_id
        if peer_id is None:
            raise DaemonError("the server did not push a peer-id (if_ovpn needs the DATA_V2 "
                              "packet format)")
        topology = reply.topology or self.cfg.topology
        if self.ifc is None:
            self.ifc = create_interface(self.transport, self.cfg.dev or "tun",
                                        ifmode="subnet" if topology == "subnet" else "p2p")
            if self.ledger is not None:
                self.ledger.record(self.ifc.name)
            self.dc = IfOvpnPeers(self.ifc, self.sock)
        assert self.dc is not None
        self.dc.sock = self.sock             # persist-tun: the socket may be a new one
        self.peer_id = peer_id
        self.dc.new_peer(peer_id, self.remote)
        for k in self.pending_keys:
            self.dc.apply(peer_id, k)
            self.key_id = k.key_id if self.key_id is None else self.key_id
        self.pending_keys.clear()
        ping = reply.ping if reply.ping is not None else self.cfg.ping
        timeout = reply.ping_restart if reply.ping_restart is not None else self.cfg.ping_restart
        self.dc.set_keepalive(peer_id, ping, timeout)
        self._configure(reply, topology)
        self.state = "connected"
        self.attempts = 0
        self.connected_since = self.wall()
        log.info("Initialization Sequence Completed: %s peer %d on %s, %s", self.ifc.name,
                 peer_id, format_addr(self.remote), self.cipher)

    def _configure(self, reply: PushReply, topology: str) -> None:
        """ifconfig / routes from the PUSH_REPLY (plus the config's own routes)."""
        assert self.ifc is not None
        name, nc = self.ifc.name, self.netcfg
        nc.set_mtu(name, reply.tun_mtu or self.cfg.tun_mtu)
        gw4: str | None = reply.route_gateway
        if reply.ifconfig is not None:
            local, second = reply.ifconfig
            if topology == "subnet":
                nc.add_address(name, ipaddress.IPv4Interface(f"{local}/{second}"))
            else:
                nc.add_address(name, ipaddress.IPv4Interface(f"{local}/32"), peer=second)
                gw4 = gw4 or str(second)
        gw6 = None
        if reply.ifconfig_ipv6 is not None:
            nc.add_address(name, reply.ifconfig_ipv6[0])
            gw6 = str(reply.ifconfig_ipv6[1]) if reply.ifconfig_ipv6[1] else None
        routes = [] if self.cfg.route_nopull else list(reply.routes)
        for r in routes + list(self.cfg.routes):
            net = ipaddress.IPv4Network(f"{r.network}/{r.netmask}", strict=False) \
                if _is_ip(r.network) else None
            if net is None:
                log.warning("route %s: only literal networks are supported; skipped", r.network)
                continue
            gw = r.gateway if r.gateway and _is_ip(r.gateway) else gw4
            if r.gateway in ("net_gateway", "remote_host"):
                log.warning("route %s via %s is not supported; skipped", net, r.gateway)
                continue
            self._route(net, gw, r.metric)
        if not self.cfg.route_nopull:
            for r6 in reply.routes_ipv6:
                gw = r6.gateway if r6.gateway and _is_ip(r6.gateway) else gw6
                self._route(r6.network, gw, r6.metric)
        if reply.redirect_gateway is not None or self.cfg.redirect_gateway is not None:
            log.warning("redirect-gateway is not applied by ovpnctl client (add the default "
                        "route yourself)")

    def _route(self, net: Any, gw: str | None, metric: int | None) -> None:
        assert self.ifc is not None
        try:
            self.netcfg.add_route(self.ifc.name, net, gw, metric=metric)
        except OvpnError as exc:
            log.warning("route %s: %s", net, exc)

    def _ended(self, e: ev.ConnectionTerminated, now: float) -> None:
        why = self._restart_reason or f"{e.reason}: {e.message}"
        self._restart_reason = None
        log.info("connection ended (%s)", why)
        self._teardown()
        self.session = None
        if self.stopping or self._finished:
            self._finish(self._exit_status)
            return
        if e.reason == "auth-failed" and self.cfg.auth_retry == "none":
            self._finish(1)
            return
        if e.reason == "halt":
            self._finish(1)
            return
        self._schedule_retry(now)

    def _teardown(self) -> None:
        """Everything the connection created: routes, the peer, the interface."""
        self.netcfg.undo_all()
        if self.ifc is not None:
            if self.cfg.persist_tun and not self.stopping and self.dc is not None \
                    and self.peer_id is not None:
                try:
                    self.dc.del_peer(self.peer_id)
                except OvpnError as exc:
                    log.warning("DEL_PEER: %s", exc)
            else:
                try:
                    self.ifc.close()
                except OvpnError as exc:
                    log.warning("destroying %s: %s", self.ifc.name, exc)
                if self.ledger is not None:
                    self.ledger.release()
                self.ifc = None
                self.dc = None
        self.peer_id = None if self.ifc is None else self.peer_id
        self.pushed = None
        self.pending_keys.clear()
        self.connected_since = None
        self.key_id = None
        self.state = "reconnecting"

    # ------------------------------------------------------------------ kernel -> session
    def handle_notifications(self, now: float) -> None:
        if self.dc is None:
            return
        for n in self.dc.drain():
            if n.peer_id != self.peer_id:
                continue                     # an older peer of ours
            if isinstance(n, PeerDeleted):
                self.dc.forget(n.peer_id)
                if n.reason == DelReason.TIMEOUT and self.session is not None:
                    log.info("keepalive timeout: ping-restart")
                    self._restart_reason = "ping-restart (keepalive timeout)"
                    self.session.close(now, linger=0.0)
                    self.session.handle_timer(now)
            elif isinstance(n, RotateKey) and self.session is not None:
                try:
                    self.session.renegotiate(now)
                except LocalProtocolError as exc:
                    log.debug("ROTATE_KEY ignored: %s", exc)
        self.pump(now)

    # ------------------------------------------------------------------ control / lifecycle
    def status(self) -> DaemonStatus:
        clients = []
        if self.state == "connected" and self.peer_id is not None and self.dc is not None:
            st = self.dc.stats().get(self.peer_id)
            s = self.session
            reply = self.pushed
            clients.append(ClientStatus(
                peer_id=self.peer_id,
                common_name=s.peer_common_name if s is not None else None, username=None,
                real_address=format_addr(self.remote),
                vpn_ipv4=str(reply.ifconfig[0]) if reply and reply.ifconfig else None,
                vpn_ipv6=(str(reply.ifconfig_ipv6[0].ip) if reply and reply.ifconfig_ipv6
                          else None),
                cipher=self.cipher, key_id=self.key_id, connected_since=self.connected_since,
                last_handshake=self.last_handshake,
                bytes_in=st.bytes_in if st else 0, bytes_out=st.bytes_out if st else 0,
                packets_in=st.packets_in if st else 0, packets_out=st.packets_out if st else 0))
        local = None
        try:
            local = format_addr(self.sock.getsockname()) if self.sock is not None else None
        except OSError:
            pass
        return DaemonStatus(role="client", config=self.cfg.path, pid=os.getpid(),
                            engine=self.engine, interface=self.ifc.name if self.ifc else None,
                            started=self.started,
                            state="stopping" if self.stopping else self.state, clients=clients,
                            local=local, remote=format_addr(self.remote))

    def kill(self, target: str, now: float) -> list[int]:
        raise DaemonError("kill is a server command; stop a client with SIGTERM")

    def reload_from_disk(self) -> list[str]:
        """SIGHUP: like OpenVPN, re-read the config and reconnect."""
        cfg = configmod.load(self.cfg.path)
        check_client_config(cfg)
        self.cfg = cfg
        self.settings = client_settings(cfg)
        self.remotes = [r for r in cfg.remotes if r.proto.startswith("udp")]
        self.remote_index = -1
        now = self.clock()
        self._restart_reason = "SIGHUP"
        if self.session is not None and self.session.terminated is None:
            self.session.close(now, linger=EXIT_LINGER)
            self.pump(now)
        return []

    def begin_shutdown(self, now: float) -> None:
        """SIGTERM: EXIT on the control channel (if negotiated), then everything goes."""
        self.stopping = True
        self.retry_at = None
        s = self.session
        if s is not None and s.terminated is None:
            s.close(now, linger=EXIT_LINGER)
            self.pump(now)
        else:
            self._finish(self._exit_status)

    def shutdown_done(self) -> bool:
        return self.session is None or self.session.terminated is not None

    def _finish(self, status: int) -> None:
        self._finished = True
        self._exit_status = status

    def finished(self) -> bool:
        return self._finished

    def exit_status(self) -> int:
        return self._exit_status

    def close(self) -> None:
        self.stopping = True
        self._teardown()
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _is_ip(text: str | None) -> bool:
    if not text:
        return False
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


# --------------------------------------------------------------------------- real I/O

def run_client(config_path: str, *, engine: str = "auto", engine_socket: str | None = None,
               control_socket: str | None = None) -> int:
    """``ovpnctl client``: connect, keep the tunnel up, remove everything at the end."""
    from bsd_ovpn.daemon.control import ControlServer, default_socket_path
    from bsd_ovpn.daemon.loop import Loop, read_datagrams, serve
    from bsd_ovpn.daemon.stale import InterfaceLedger
    from bsd_ovpn.engine.steering import make_udp_socket
    from bsd_ovpn.engines import engine_kind, open_transport

    cfg = configmod.load(config_path)
    check_client_config(cfg)
    transport = open_transport(engine, socket_path=engine_socket)
    loop = Loop()
    control = daemon = None
    registered: list[Any] = []

    def open_socket(family: int) -> Any:
        host = cfg.local or ("::" if family == socket.AF_INET6 else "0.0.0.0")
        port = 0 if cfg.nobind else (cfg.lport or cfg.port)
        try:
            sock = make_udp_socket((host, port))
        except OSError as exc:
            raise DaemonError(f"cannot bind UDP {host}:{port}: {exc.strerror}") from exc
        sock.setblocking(False)
        for old in registered:
            loop.remove_reader(old)
        registered[:] = [sock]
        loop.add_reader(sock, lambda: on_udp(sock))
        return sock

    def on_udp(sock: Any) -> None:
        now = loop.clock()
        for data, addr in read_datagrams(sock):
            daemon.datagram_received(data, addr, now)
        daemon.handle_notifications(now)

    try:
        daemon = ClientDaemon(cfg, transport=transport, open_socket=open_socket,
                              engine=engine_kind(transport))
        control = ControlServer(control_socket or default_socket_path(config_path),
                                lambda req: {})
        # a crashed daemon of this config left its interface in the kernel/engine
        daemon.ledger = InterfaceLedger(transport, config=config_path, control=control.path)
        daemon.ledger.sweep(cfg.dev or "tun")
        if cfg.writepid:
            with open(cfg.writepid, "w") as f:
                f.write(f"{os.getpid()}\n")
        daemon.start(loop.clock())
        return serve(daemon, loop, control=control, status_file=cfg.status,
                     status_version=cfg.status_version, user=cfg.user, group=cfg.group,
                     shutdown_linger=EXIT_LINGER + 0.5)
    finally:
        for old in registered:
            loop.remove_reader(old)
        if daemon is not None:
            daemon.close()
        if control is not None:
            control.close()
        loop.close()
        transport.close()
        if cfg.writepid:
            try:
                os.unlink(cfg.writepid)
            except OSError:
                pass
