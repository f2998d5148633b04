"""What the low-level ovpnctl commands print: stable JSON and short text.

The JSON shapes are a public interface (docs/json.md documents every field)
that scripts and monitoring parse, so they are built here field by field from
the typed API's values instead of dumping whatever ``as_dict()`` happens to
return: a change in a library dataclass cannot silently change the output.
Names are the kernel's (peer_id, slot, key_id, packets_in, ...); counters are
integers; an absent value is ``null``, never a missing key.  Fields may be
added in later versions; none are renamed or removed.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from bsd_ovpn.ifovpn import DelReason
from bsd_ovpn.interface import (
    Endpoint,
    Float,
    InOut,
    InterfaceStats,
    Notification,
    PeerDeleted,
    PeerStats,
    RotateKey,
    UnknownNotification,
)

#: GET_STATS counter pairs, in the kernel's reply order.
STATS_FIELDS = ("lost_ctrl", "lost_data", "nomem_data", "data", "ctrl", "tunnel", "transport")


def dumps(obj: Any, *, lines: bool = False) -> str:
    """One JSON document: indented for a single object, one line per object
    for streams (``lines=True``: ``events --json``, JSON Lines)."""
    if lines:
        return json.dumps(obj, separators=(",", ":"))
    return json.dumps(obj, indent=2)


# -- JSON ---------------------------------------------------------------------

def endpoint_json(ep: Endpoint) -> dict[str, Any]:
    out: dict[str, Any] = {"address": str(ep.address), "port": ep.port}
    if ep.address.version == 6:
        out["scope_id"] = ep.scope_id
    return out


def inout_json(pair: InOut) -> dict[str, int]:
    return {"in": pair.in_, "out": pair.out}


def interface_stats_json(stats: InterfaceStats) -> dict[str, Any]:
    return {name: inout_json(getattr(stats, name)) for name in STATS_FIELDS}


def peer_json(p: PeerStats) -> dict[str, int]:
    return {"peer_id": p.peer_id, "packets_in": p.packets_in, "packets_out": p.packets_out,
            "bytes_in": p.bytes_in, "bytes_out": p.bytes_out}


def peers_json(peers: Mapping[int, PeerStats] | None) -> list[dict[str, int]] | None:
    if peers is None:
        return None
    return [peer_json(peers[k]) for k in sorted(peers)]


def _reason(reason: DelReason | int | None) -> str | int | None:
    if isinstance(reason, DelReason):
        return reason.name.lower()
    return reason


def notification_json(ifname: str, n: Notification) -> dict[str, Any]:
    """One GET_PKT notification; ``notification`` is the kernel's type name."""
    out: dict[str, Any] = {"interface": ifname, "peer_id": n.peer_id}
    if isinstance(n, PeerDeleted):
        out.update(notification="del_peer", del_reason=_reason(n.reason),
                   packets_in=n.packets_in, packets_out=n.packets_out,
                   bytes_in=n.bytes_in, bytes_out=n.bytes_out)
    elif isinstance(n, RotateKey):
        out["notification"] = "rotate_key"
    elif isinstance(n, Float):
        out.update(notification="float", address=endpoint_json(n.address))
    elif isinstance(n, UnknownNotification):
        out["notification"] = n.notification
    return out


def stats_json(ifname: str, engine: str, stats: InterfaceStats,
               peers: Mapping[int, PeerStats] | None) -> dict[str, Any]:
    return {"interface": ifname, "engine": engine, "stats": interface_stats_json(stats),
            "peers": peers_json(peers)}


def peer_list_json(ifname: str, engine: str, peers: Mapping[int, PeerStats]) -> dict[str, Any]:
    return {"interface": ifname, "engine": engine, "peers": peers_json(peers)}


def interface_list_json(engine: str,
                         items: Iterable[tuple[str, list[int] | None]]) -> dict[str, Any]:
    return {"engine": engine,
            "interfaces": [{"name": name, "peer_ids": ids} for name, ids in items]}


# -- text ---------------------------------------------------------------------

def _n(value: int | None) -> str:
    return "?" if value is None else str(value)


def peer_text(p: PeerStats) -> str:
    return (f"peer {p.peer_id}: packets in {p.packets_in} out {p.packets_out}, "
            f"bytes in {p.bytes_in} out {p.bytes_out}")


def stats_text(ifname: str, stats: InterfaceStats,
               peers: Mapping[int, PeerStats] | None) -> str:
    lines = [f"interface {ifname}"]
    for name in STATS_FIELDS:
        pair = getattr(stats, name)
        lines.append(f"  {name:<11} in {pair.in_:>12}  out {pair.out:>12}")
    if peers is None:
        lines.append("  (per-peer counters not supported by this kernel)")
    else:
        lines.extend("  " + peer_text(peers[k]) for k in sorted(peers))
    return "\n".join(lines)


def notification_text(ifname: str, n: Notification) -> str:
    where = f"{ifname} peer {n.peer_id}"
    if isinstance(n, PeerDeleted):
        reason = _reason(n.reason)
        return (f"{where}: deleted ({'unknown reason' if reason is None else reason}), "
                f"packets in {_n(n.packets_in)} out {_n(n.packets_out)}, "
                f"bytes in {_n(n.bytes_in)} out {_n(n.bytes_out)}")
    if isinstance(n, RotateKey):
        return f"{where}: rotate key (the primary key's packet counter is near its limit)"
    if isinstance(n, Float):
        return f"{where}: floated to {n.address}"
    assert isinstance(n, UnknownNotification)
    return f"{where}: unknown notification {n.notification}"
