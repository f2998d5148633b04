"""``--engine`` / ``--engine-socket`` for the low-level commands, and opening interfaces.

The options go on the command groups (``ovpnctl peer --engine userspace add
...``) and on every leaf command (``ovpnctl peer add --engine userspace ...``),
because people put options after the verb.  Option callbacks store the
choice in ``ctx.meta`` (shared by the whole command chain); a value given on
the leaf wins over the group's, and ``$BSD_OVPN_ENGINE`` /
``$BSD_OVPN_ENGINE_SOCKET`` apply when neither gave one.  The decision
itself is :func:`bsd_ovpn.engines.open_transport`'s.

Tests inject a transport by invoking the CLI with ``obj={"transport": t}``.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import click

from bsd_ovpn import engines
from bsd_ovpn.engines import ENGINE_ENV, ENGINES, open_transport
from bsd_ovpn.interface import Interface
from bsd_ovpn.transport import Transport

F = TypeVar("F", bound=Callable[..., Any])

_ENGINE_KEY = "bsd_ovpn.engine"
_SOCKET_KEY = "bsd_ovpn.engine_socket"


def _store(key: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    def callback(ctx: click.Context, _param: click.Parameter, value: Any) -> Any:
        if value is not None:
            ctx.meta[key] = value
        return value
    return callback


def engine_options(f: F) -> F:
    """Add --engine and --engine-socket (not passed to the function)."""
    f = click.option(
        "--engine-socket", metavar="PATH", default=None, expose_value=False,
        is_eager=True, callback=_store(_SOCKET_KEY),
        help="Userspace engine control socket (default $BSD_OVPN_ENGINE_SOCKET or "
             f"{engines.DEFAULT_ENGINE_SOCKET}).")(f)
    f = click.option(
        "--engine", type=click.Choice(ENGINES), default=None, expose_value=False,
        is_eager=True, callback=_store(_ENGINE_KEY),
        help="if_ovpn implementation: the FreeBSD kernel, the userspace engine, or auto "
             "(kernel if if_ovpn is loaded; default, or $BSD_OVPN_ENGINE).")(f)
    return f


def chosen_engine(ctx: click.Context) -> tuple[str, str | None]:
    engine = ctx.meta.get(_ENGINE_KEY) or os.environ.get(ENGINE_ENV) or "auto"
    if engine not in ENGINES:
        from bsd_ovpn.cli.args import BadInput

        raise BadInput(f"${ENGINE_ENV}={engine!r}: one of {', '.join(ENGINES)}")
    return engine, ctx.meta.get(_SOCKET_KEY)


@contextlib.contextmanager
def transport(ctx: click.Context) -> Iterator[Transport]:
    """The chosen engine's transport, closed afterwards (an injected one is left open)."""
    obj = ctx.find_root().obj
    injected = obj.get("transport") if isinstance(obj, dict) else None
    if injected is not None:
        yield injected
        return
    engine, path = chosen_engine(ctx)
    tr = open_transport(engine, socket_path=path)
    try:
        yield tr
    finally:
        tr.close()


@contextlib.contextmanager
def interface(ctx: click.Context, name: str) -> Iterator[Interface]:
    """An existing interface on the chosen engine (checked with POLL_PKT)."""
    with transport(ctx) as tr:
        yield Interface.open(name, transport=tr)


def engine_name(tr: Transport) -> str:
    return engines.engine_kind(tr)
