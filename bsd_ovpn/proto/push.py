"""Control-channel messages: NUL framing, PUSH_REPLY options, AUTH_FAILED & co.

After key method 2, the TLS channel carries NUL-terminated printable ASCII
strings (protocol spec §4.2, §11.3).  This module splits a TLS read into
messages, classifies them, parses PUSH_REPLY (with ``push-continuation``
reassembly) into typed options, and builds every message a client or server
sends, so the session layer never touches string formats.
"""
from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Union

from bsd_ovpn.errors import RemoteProtocolError, ValidationError

__all__ = [
    "MAX_MESSAGE_LEN", "PUSH_BUNDLE_SIZE",
    "AuthFailed", "AuthPending", "ControlMessage", "ControlMessageError", "CrResponse", "Exit",
    "Halt", "Info", "InfoPre", "PushError", "PushReply", "PushReplyAssembler", "PushReplyPart",
    "PushRequest", "Restart", "Route", "RouteIPv6", "SplitMessages", "Unknown",
    "build_auth_failed", "build_auth_failed_temp", "build_auth_pending", "build_exit",
    "build_halt", "build_info", "build_info_pre", "build_push_reply", "build_push_request",
    "build_restart", "encode_message", "parse_message", "split_messages",
]

#: A control message plus its NUL must fit OpenVPN's 2048-byte TLS read buffer.
MAX_MESSAGE_LEN = 2047
#: OpenVPN's PUSH_BUNDLE_SIZE: the buffer one PUSH_REPLY part is built in.
PUSH_BUNDLE_SIZE = 1024
_CONT_MORE = ",push-continuation 2"
_UINT_RE = re.compile(r"[0-9]{1,9}")
_CONT_LAST = ",push-continuation 1"


class ControlMessageError(RemoteProtocolError):
    """A control-channel message was malformed (OpenVPN drops it with a warning)."""


class PushError(ControlMessageError):
    """A pushed option is malformed; ``option`` is the offending option text."""

    def __init__(self, option: str, message: str) -> None:
        self.option = option
        super().__init__(f"pushed option {option!r}: {message}")


# --------------------------------------------------------------------------- framing

def _printable(s: str) -> bool:
    """Every character in " ".."~" (0x20-0x7E): for ASCII that is exactly isprintable()."""
    return s.isascii() and s.isprintable()


@dataclass
class SplitMessages:
    """Result of :func:`split_messages`: the good messages and what was dropped."""

    messages: list[str]
    rejected: list[ControlMessageError]


def split_messages(data: bytes) -> SplitMessages:
    """Split one TLS read into NUL-terminated control messages (§4.2).

    Trailing CR/LF is stripped; a message with any other non-printable byte,
    or trailing bytes without a NUL, is rejected (reported, not returned),
    exactly where OpenVPN logs "Received control with invalid characters".
    """
    messages: list[str] = []
    rejected: list[ControlMessageError] = []
    parts = bytes(data).split(b"\x00")
    tail = parts.pop()  # after the last NUL: an unterminated fragment (or b"")
    for raw in parts:
        raw = raw.rstrip(b"\r\n")
        if not raw:
            continue
        text = raw.decode("latin-1")
        if not _printable(text):
            rejected.append(ControlMessageError(
                f"control message with non-printable characters dropped: {raw[:64].hex()}"))
            continue
        messages.append(text)
    if tail:
        rejected.append(ControlMessageError(
            f"control message without terminating NUL dropped ({len(tail)} bytes)"))
    return SplitMessages(messages, rejected)


def encode_message(message: str) -> bytes:
    """The bytes for one TLS write: printable ASCII plus NUL, at most 2048 bytes."""
    if not _printable(message):
        raise ValidationError(f"control message must be printable ASCII: {message[:64]!r}")
    if len(message) > MAX_MESSAGE_LEN:
        raise ValidationError(f"control message of {len(message)} bytes exceeds "
                              f"{MAX_MESSAGE_LEN} (+ NUL)")
    return message.encode("ascii") + b"\x00"


# --------------------------------------------------------------------------- messages

@dataclass(frozen=True)
class PushRequest:
    pass


@dataclass(frozen=True)
class PushReplyPart:
    """One PUSH_REPLY message: its raw options and its continuation marker (0/1/2)."""

    options: tuple[str, ...]
    continuation: int


@dataclass(frozen=True)
class AuthFailed:
    """``AUTH_FAILED[,reason]``; ``TEMP[...]`` reasons are split into their flags."""

    reason: str | None = None
    temp: bool = False
    backoff: int | None = None
    advance: str | None = None     # "no" | "remote" | "addr"
    message: str | None = None     # text after "TEMP[...]:" for temp failures

    @property
    def session_expired(self) -> bool:
        """``AUTH_FAILED,SESSION...``: the auth-token expired; retry with credentials."""
        return bool(self.reason and self.reason.startswith("SESSION"))

    @property
    def challenge(self) -> str | None:
        """The ``CRV1:`` dynamic-challenge text, if this is one."""
        if self.reason and self.reason.startswith("CRV1:"):
            return self.reason[5:]
        return None


@dataclass(frozen=True)
class AuthPending:
    timeout: int | None = None
    keywords: tuple[str, ...] = ()


@dataclass(frozen=True)
class InfoPre:
    text: str


@dataclass(frozen=True)
class Info:
    text: str


@dataclass(frozen=True)
class CrResponse:
    response: str


@dataclass(frozen=True)
class Restart:
    """``RESTART[,[flags]message]``: N = advance to next remote, P = keep credentials."""

    message: str = ""
    advance: bool = False
    preserve: bool = False


@dataclass(frozen=True)
class Halt:
    message: str = ""
    preserve: bool = False


@dataclass(frozen=True)
class Exit:
    pass


@dataclass(frozen=True)
class Unknown:
    text: str


ControlMessage = Union[PushRequest, PushReplyPart, AuthFailed, AuthPending, InfoPre, Info,
                       CrResponse, Restart, Halt, Exit, Unknown]


def _parse_temp(rest: str) -> tuple[int | None, str | None, str | None]:
    """Flags and text after ``AUTH_FAILED,TEMP``: ``[backoff N,advance X]:message``.

    Lenient like OpenVPN: unknown or malformed flags are ignored, and the
    message is only what follows a ``:``.
    """
    backoff: int | None = None
    advance: str | None = None
    end = rest.find("]")
    if rest.startswith("[") and end >= 0:
        for flag in rest[1:end].split(","):
            words = flag.split()
            if len(words) == 2 and words[0] == "backoff" and _UINT_RE.fullmatch(words[1]):
                backoff = int(words[1])
            elif len(words) == 2 and words[0] == "advance" and words[1] in ("no", "remote",
                                                                              "addr"):
                advance = words[1]
        rest = rest[end + 1:]
    message = rest[1:] if rest.startswith(":") else ""
    return backoff, advance, message or None


def _signal_flags(body: str) -> tuple[str, bool, bool]:
    """``[NP]message`` → (message, advance, preserve) as OpenVPN reads RESTART/HALT."""
    advance = preserve = False
    if body.startswith("["):
        end = body.find("]")
        flags = body[1:end] if end >= 0 else body[1:]
        advance, preserve = "N" in flags, "P" in flags
        body = body[end + 1:] if end >= 0 else ""
    return body, advance, preserve


def parse_message(message: str) -> ControlMessage:
    """Classify one control message by prefix, in OpenVPN's dispatch order."""
    if message.startswith("AUTH_FAILED"):
        if message.startswith("AUTH_FAILED,"):
            reason = message[len("AUTH_FAILED,"):] or None
            if reason and reason.startswith("TEMP"):
                backoff, advance, text = _parse_temp(reason[4:])
                return AuthFailed(reason=reason, temp=True, backoff=backoff, advance=advance,
                                  message=text)
            return AuthFailed(reason=reason)
        return AuthFailed()
    if message == "PUSH_REQUEST":
        return PushRequest()
    if message.startswith("PUSH_REPLY"):
        return _parse_push_reply_part(message)
    if message.startswith("RESTART"):
        body = message[len("RESTART,"):] if message.startswith("RESTART,") else ""
        text, advance, preserve = _signal_flags(body)
        return Restart(text, advance, preserve)
    if message.startswith("HALT"):
        body = message[len("HALT,"):] if message.startswith("HALT,") else ""
        text, _, preserve = _signal_flags(body)
        return Halt(text, preserve)
    if message.startswith("INFO_PRE,"):
        return InfoPre(message[len("INFO_PRE,"):])
    if message.startswith("INFO,"):
        return Info(message[len("INFO,"):])
    if message.startswith("CR_RESPONSE,"):
        return CrResponse(message[len("CR_RESPONSE,"):])
    if message.startswith("AUTH_PENDING"):
        timeout: int | None = None
        keywords: list[str] = []
        for kw in message[len("AUTH_PENDING,"):].split(",") \
                if message.startswith("AUTH_PENDING,") else []:
            words = kw.split()
            if len(words) == 2 and words[0] == "timeout":
                if not _UINT_RE.fullmatch(words[1]):
                    raise ControlMessageError(f"AUTH_PENDING: bad timeout {words[1]!r}")
                timeout = int(words[1])
            elif kw:
                keywords.append(kw)
        return AuthPending(timeout, tuple(keywords))
    if message == "EXIT":
        return Exit()
    return Unknown(message)


# --------------------------------------------------------------------------- builders

def _reason(text: str | None, what: str) -> str:
    if text is None:
        return ""
    if not _printable(text):
        raise ValidationError(f"{what} must be printable ASCII: {text!r}")
    return text


def build_push_request() -> str:
    return "PUSH_REQUEST"


def build_auth_failed(reason: str | None = None) -> str:
    r = _reason(reason, "AUTH_FAILED reason")
    return f"AUTH_FAILED,{r}" if r else "AUTH_FAILED"


def build_auth_failed_temp(message: str = "", *, backoff: int | None = None,
                           advance: str | None = None) -> str:
    """``AUTH_FAILED,TEMP[backoff N,advance X]:message`` (client needs IV_PROTO bit 8)."""
    flags = []
    if backoff is not None:
        if not isinstance(backoff, int) or backoff < 0:
            raise ValidationError(f"backoff must be a non-negative integer, got {backoff!r}")
        flags.append(f"backoff {backoff}")
    if advance is not None:
        if advance not in ("no", "remote", "addr"):
            raise ValidationError(f"advance must be no, remote or addr, got {advance!r}")
        flags.append(f"advance {advance}")
    head = f"TEMP[{','.join(flags)}]" if flags else "TEMP"
    return f"AUTH_FAILED,{head}:{_reason(message, 'AUTH_FAILED message')}"


def build_auth_pending(timeout: int | None = None) -> str:
    if timeout is None:
        return "AUTH_PENDING"
    if not isinstance(timeout, int) or timeout < 0:
        raise ValidationError(f"AUTH_PENDING timeout must be >= 0, got {timeout!r}")
    return f"AUTH_PENDING,timeout {timeout}"


def build_info(text: str) -> str:
    return f"INFO,{_reason(text, 'INFO text')}"


def build_info_pre(text: str) -> str:
    return f"INFO_PRE,{_reason(text, 'INFO_PRE text')}"


def build_restart(message: str | None = None, *, advance: bool = False,
                  preserve: bool = False) -> str:
    flags = ("N" if advance else "") + ("P" if preserve else "")
    body = (f"[{flags}]" if flags else "") + _reason(message, "RESTART message")
    return f"RESTART,{body}" if body else "RESTART"


def build_halt(message: str | None = None) -> str:
    body = _reason(message, "HALT message")
    return f"HALT,{body}" if body else "HALT"


def build_exit() -> str:
    return "EXIT"


def build_push_reply(options: list[str], max_len: int = PUSH_BUNDLE_SIZE) -> list[str]:
    """PUSH_REPLY messages carrying ``options``, split with push-continuation.

    Each message including its NUL fits in ``max_len``; a single message has
    no continuation marker, a split one ends every part with
    ``push-continuation 2`` except the last (``push-continuation 1``).
    """
    if max_len < 64 or max_len > MAX_MESSAGE_LEN + 1:
        raise ValidationError(f"max_len must be 64..{MAX_MESSAGE_LEN + 1}, got {max_len}")
    for opt in options:
        if not opt or "," in opt or not _printable(opt):
            raise ValidationError(f"push option {opt!r} must be non-empty printable ASCII "
                                  "without commas")
    head = "PUSH_REPLY"
    whole = ",".join([head, *options])
    if len(whole) + 1 <= max_len:
        return [whole]
    room = max_len - 1 - len(_CONT_MORE)  # every part must still fit its marker
    parts: list[str] = []
    cur = head
    for opt in options:
        if len(head) + 1 + len(opt) > room:
            raise ValidationError(f"push option of {len(opt)} bytes cannot fit in a "
                                  f"{max_len}-byte PUSH_REPLY")
        if len(cur) + 1 + len(opt) > room:
            parts.append(cur + _CONT_MORE)
            cur = head
        cur += "," + opt
    parts.append(cur + _CONT_LAST)
    return parts


# --------------------------------------------------------------------------- PUSH_REPLY

#: anything that makes OpenVPN's tokenizer do more than split at spaces: characters
#: outside printable ASCII (other whitespace, NUL), quotes, backslashes, comments
_NOT_PLAIN = re.compile(r"[^ -~]|[\\\"'#;]")


def _tokenize(option: str) -> list[str]:
    if not _NOT_PLAIN.search(option):
        # printable ASCII without quotes, escapes or comment characters (nearly every
        # pushed option): split_line would only split at runs of spaces, as split() does
        return option.split()
    # The config parser owns OpenVPN's quoting rules; imported lazily so this
    # module does not depend on the config layer being importable.
    from bsd_ovpn.config import split_line
    from bsd_ovpn.errors import ConfigError
    try:
        return list(split_line(option))
    except (ConfigError, ValueError) as e:
        raise PushError(option, f"cannot be tokenized ({e})") from None


def _parse_push_reply_part(message: str) -> PushReplyPart:
    if message != "PUSH_REPLY" and not message.startswith("PUSH_REPLY,"):
        raise ControlMessageError(f"not a PUSH_REPLY: {message[:64]!r}")
    opts = [o for o in message[len("PUSH_REPLY,"):].split(",")] if "," in message else []
    continuation = 0
    kept: list[str] = []
    for opt in opts:
        stripped = opt.strip()
        if not stripped:
            continue
        words = stripped.split()
        if words[0] == "push-continuation":
            if len(words) != 2 or words[1] not in ("1", "2"):
                raise PushError(stripped, "push-continuation must be 1 or 2")
            continuation = int(words[1])
            continue
        kept.append(stripped)
    return PushReplyPart(tuple(kept), continuation)


@dataclass(frozen=True)
class Route:
    """``route network [netmask [gateway [metric]]]``; words like vpn_gateway kept."""

    network: str
    netmask: str = "255.255.255.255"
    gateway: str | None = None
    metric: int | None = None

    @property
    def ip_network(self) -> ipaddress.IPv4Network | None:
        """The destination as a network, if the network is a literal address."""
        try:
            return ipaddress.IPv4Network(f"{self.network}/{self.netmask}", strict=False)
        except ValueError:
            return None


@dataclass(frozen=True)
class RouteIPv6:
    network: ipaddress.IPv6Network
    gateway: str | None = None
    metric: int | None = None


_ROUTE_WORDS = ("vpn_gateway", "net_gateway", "remote_host", "default")


def _int_arg(option: str, text: str, lo: int, hi: int) -> int:
    if not re.fullmatch(r"-?[0-9]{1,10}", text):
        raise PushError(option, f"{text!r} is not an integer")
    value = int(text)
    if not lo <= value <= hi:
        raise PushError(option, f"{value} is outside {lo}..{hi}")
    return value


def _ipv4(option: str, text: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        raise PushError(option, f"{text!r} is not an IPv4 address") from None


@dataclass
class PushReply:
    """A complete (reassembled) PUSH_REPLY as typed options.

    Scalars keep the last value pushed (as OpenVPN applies options in
    order); routes, dhcp-options and unknown options accumulate.  ``unknown``
    keeps each unrecognised option's raw text so callers can warn or apply it.
    """

    options: list[str] = field(default_factory=list)
    ifconfig: tuple[ipaddress.IPv4Address, ipaddress.IPv4Address] | None = None
    ifconfig_ipv6: tuple[ipaddress.IPv6Interface, ipaddress.IPv6Address | None] | None = None
    routes: list[Route] = field(default_factory=list)
    routes_ipv6: list[RouteIPv6] = field(default_factory=list)
    route_gateway: str | None = None
    topology: str | None = None
    ping: int | None = None
    ping_restart: int | None = None
    peer_id: int | None = None
    cipher: str | None = None
    protocol_flags: frozenset[str] = frozenset()
    key_derivation: str | None = None
    tun_mtu: int | None = None
    dhcp_options: list[tuple[str, ...]] = field(default_factory=list)
    redirect_gateway: tuple[str, ...] | None = None
    auth_token: str | None = None
    block_outside_dns: bool = False
    unknown: list[str] = field(default_factory=list)

    @property
    def uses_ekm(self) -> bool:
        """Whether the server told us to derive data keys with TLS-EKM (§9.2)."""
        return "tls-ekm" in self.protocol_flags or self.key_derivation == "tls-ekm"

    @classmethod
    def from_options(cls, options: Iterable[str]) -> PushReply:
        reply = cls()
        for opt in options:
            reply._apply(opt)
        return reply

    @classmethod
    def parse(cls, message: str) -> PushReply:
        """One complete PUSH_REPLY message (no continuation handling)."""
        part = _parse_push_reply_part(message)
        return cls.from_options(part.options)

    def _apply(self, opt: str) -> None:
        self.options.append(opt)
        words = _tokenize(opt)
        if not words:
            return
        name, args = words[0], words[1:]

        def need(lo: int, hi: int) -> None:
            if not lo <= len(args) <= hi:
                want = str(lo) if lo == hi else f"{lo}..{hi}"
                raise PushError(opt, f"{name} takes {want} arguments, got {len(args)}")

        if name == "ifconfig":
            need(2, 2)
            self.ifconfig = (_ipv4(opt, args[0]), _ipv4(opt, args[1]))
        elif name == "ifconfig-ipv6":
            need(1, 2)
            try:
                iface = ipaddress.IPv6Interface(args[0])
                peer = ipaddress.IPv6Address(args[1]) if len(args) > 1 else None
            except ValueError as e:
                raise PushError(opt, str(e)) from None
            self.ifconfig_ipv6 = (iface, peer)
        elif name == "route":
            need(1, 4)
            netmask = args[1] if len(args) > 1 and args[1] != "default" else "255.255.255.255"
            if netmask != "255.255.255.255":
                _ipv4(opt, netmask)
            gateway = args[2] if len(args) > 2 and args[2] != "default" else None
            if gateway is not None and gateway not in _ROUTE_WORDS:
                _ipv4(opt, gateway)
            metric = _int_arg(opt, args[3], 0, 2**31 - 1) if len(args) > 3 and \
                args[3] != "default" else None
            self.routes.append(Route(args[0], netmask, gateway, metric))
        elif name == "route-ipv6":
            need(1, 3)
            try:
                net = ipaddress.IPv6Network(args[0], strict=False)
            except ValueError as e:
                raise PushError(opt, str(e)) from None
            gateway = args[1] if len(args) > 1 else None
            if gateway is not None and gateway not in _ROUTE_WORDS:
                try:
                    ipaddress.IPv6Address(gateway)
                except ValueError as e:
                    raise PushError(opt, str(e)) from None
            metric = _int_arg(opt, args[2], 0, 2**31 - 1) if len(args) > 2 else None
            self.routes_ipv6.append(RouteIPv6(net, gateway, metric))
        elif name == "route-gateway":
            need(1, 1)
            if args[0] != "dhcp":
                _ipv4(opt, args[0])
            self.route_gateway = args[0]
        elif name == "topology":
            need(1, 1)
            if args[0] not in ("net30", "p2p", "subnet"):
                raise PushError(opt, "topology must be net30, p2p or subnet")
            self.topology = args[0]
        elif name == "ping":
            need(1, 1)
            self.ping = _int_arg(opt, args[0], 0, 2**31 - 1)
        elif name == "ping-restart":
            need(1, 1)
            self.ping_restart = _int_arg(opt, args[0], 0, 2**31 - 1)
        elif name == "peer-id":
            need(1, 1)
            self.peer_id = _int_arg(opt, args[0], 0, 0xFFFFFF)
        elif name == "cipher":
            need(1, 1)
            self.cipher = args[0]
        elif name == "protocol-flags":
            self.protocol_flags = self.protocol_flags | frozenset(args)
        elif name == "key-derivation":
            need(1, 1)
            self.key_derivation = args[0]
        elif name == "tun-mtu":
            need(1, 1)
            self.tun_mtu = _int_arg(opt, args[0], 48, 65535)
        elif name == "dhcp-option":
            need(1, 2)
            self.dhcp_options.append(tuple(args))
        elif name == "redirect-gateway":
            self.redirect_gateway = tuple(args)
        elif name == "auth-token":
            need(1, 1)
            self.auth_token = args[0]
        elif name == "block-outside-dns":
            need(0, 0)
            self.block_outside_dns = True
        else:
            self.unknown.append(opt)


class PushReplyAssembler:
    """Reassembles ``push-continuation`` parts into one :class:`PushReply`.

    Feed every PUSH_REPLY message; ``feed`` returns the complete reply when a
    part without continuation or with ``push-continuation 1`` arrives, else
    ``None``.  A bound on parts keeps a misbehaving server from growing it
    without limit.
    """

    MAX_PARTS = 64

    def __init__(self) -> None:
        self._options: list[str] = []
        self._parts = 0

    @property
    def pending(self) -> bool:
        return self._parts > 0

    def reset(self) -> None:
        self._options = []
        self._parts = 0

    def feed(self, message: str | PushReplyPart) -> PushReply | None:
        part = message if isinstance(message, PushReplyPart) else \
            _parse_push_reply_part(message)
        self._parts += 1
        if self._parts > self.MAX_PARTS:
            self.reset()
            raise ControlMessageError(f"PUSH_REPLY continued over more than "
                                      f"{self.MAX_PARTS} messages")
        self._options.extend(part.options)
        if part.continuation == 2:
            return None
        options, self._options, self._parts = self._options, [], 0
        return PushReply.from_options(options)
