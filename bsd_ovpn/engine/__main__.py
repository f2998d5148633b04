"""``python3 -m bsd_ovpn.engine``: run the userspace engine (same as ``ovpnctl engine run``).

Both entry points agree: the socket defaults to ``--socket``, else
``$BSD_OVPN_ENGINE_SOCKET``, else :data:`bsd_ovpn.paths.ENGINE_SOCKET`
(resolved by :func:`bsd_ovpn.engines.engine_socket_path`), the log lines look
the same and go through :func:`bsd_ovpn.logutil.harden`.  This one also takes
``--dataplane`` (the C or the Python packet mover), for tests and debugging.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from bsd_ovpn import engines, logutil
from bsd_ovpn.engine.daemon import DATAPLANE_KINDS

log = logging.getLogger("bsd_ovpn.engine")


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
    root = logging.getLogger()
    before = list(root.handlers)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s engine: %(message)s")
    for handler in root.handlers:                 # redaction + rate limit on our own handler
        if handler not in before:
            logutil.harden(handler)
    if os.geteuid() != 0:
        print("bsd_ovpn engine: must run as root (tun devices, shared UDP ports)", file=sys.stderr)
        return 1
    from bsd_ovpn.engine import daemon as daemon_mod
    parent = os.path.dirname(os.path.abspath(args.socket))
    try:
        os.makedirs(parent, mode=0o755, exist_ok=True)
        daemon = daemon_mod.EngineDaemon(args.socket, group=args.group, dataplane=args.dataplane)
    except KeyError:
        print(f"bsd_ovpn engine: --group {args.group!r}: no such group", file=sys.stderr)
        return 1
    except (RuntimeError, OSError) as exc:
        print(f"bsd_ovpn engine: cannot start the engine at {args.socket}: {exc}",
              file=sys.stderr)
        return 1
    daemon.engine.replay_protection = not args.no_replay_protection
    signal.signal(signal.SIGTERM, daemon.stop)
    signal.signal(signal.SIGINT, daemon.stop)
    log.info("listening on %s", args.socket)
    daemon.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
