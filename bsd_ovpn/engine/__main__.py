"""``python3 -m bsd_ovpn.engine``: run the userspace engine (same as ``ovpnctl engine run``).

Both entry points call :func:`bsd_ovpn.engine.daemon.run`: the socket
defaults to ``--socket``, else ``$BSD_OVPN_ENGINE_SOCKET``, else
:data:`bsd_ovpn.paths.ENGINE_SOCKET`, and log lines go through
:func:`bsd_ovpn.logutil.harden` (:func:`~bsd_ovpn.engine.daemon.setup_logging`).  This entry point needs only the standard
library's argparse, for hosts or service managers that avoid the CLI.
"""
from __future__ import annotations

import argparse
import sys

from bsd_ovpn import engines
from bsd_ovpn.engine.daemon import DATAPLANE_KINDS, EngineStartError, run, setup_logging


def build_parser() -> argparse.ArgumentParser:
    """The command line; ``--socket`` defaults as ``ovpnctl engine run`` does (read now)."""
    default = engines.engine_socket_path(None)
    ap = argparse.ArgumentParser(prog="python3 -m bsd_ovpn.engine",
                                 description="if_ovpn command set in userspace, over a tun device")
    ap.add_argument("--socket", default=default,
                    help=f"control socket (default ${engines.ENGINE_SOCKET_ENV} or "
                         f"{engines.DEFAULT_ENGINE_SOCKET}; now {default})")
    ap.add_argument("--group", default=None,
                    help="group allowed to use the engine (socket mode 0660; default: root only, 0600)")
    ap.add_argument("--no-replay-protection", action="store_true",
                    help="accept replayed data packets (the FreeBSD kernel's default)")
    ap.add_argument("--dataplane", choices=DATAPLANE_KINDS, default="auto",
                    help="packet mover: the C fast path, the Python one, or auto (C if it loads); "
                         "the choice is logged at INFO as 'data plane: NAME'")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(verbose=args.verbose)
    try:
        run(args.socket, group=args.group, dataplane=args.dataplane,
            replay_protection=not args.no_replay_protection)
    except EngineStartError as exc:
        print(f"bsd_ovpn engine: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
