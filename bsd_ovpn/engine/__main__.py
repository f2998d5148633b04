"""``python3 -m bsd_ovpn.engine --socket PATH [--group G]``: run the userspace engine."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from bsd_ovpn.engine.transport import DEFAULT_SOCKET


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bsd_ovpn.engine",
                                 description="if_ovpn command set in userspace, over a tun device")
    ap.add_argument("--socket", default=DEFAULT_SOCKET, help=f"control socket (default {DEFAULT_SOCKET})")
    ap.add_argument("--group", default=None,
                    help="group allowed to use the engine (socket mode 0660; default: root only, 0600)")
    ap.add_argument("--no-replay-protection", action="store_true",
                    help="accept replayed data packets (the FreeBSD kernel's default)")
    ap.add_argument("--dataplane", choices=("auto", "python", "fast"), default="auto",
                    help="packet mover: the C fast path, the Python one, or auto (C if it loads)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s engine: %(message)s")
    if os.geteuid() != 0:
        print("bsd_ovpn engine: must run as root (tun devices, shared UDP ports)", file=sys.stderr)
        return 1
    from bsd_ovpn.engine.daemon import EngineDaemon
    import signal
    os.makedirs(os.path.dirname(os.path.abspath(args.socket)), exist_ok=True)
    try:
        daemon = EngineDaemon(args.socket, group=args.group, dataplane=args.dataplane)
    except (RuntimeError, KeyError, OSError) as exc:
        print(f"bsd_ovpn engine: {exc}", file=sys.stderr)
        return 1
    daemon.engine.replay_protection = not args.no_replay_protection
    signal.signal(signal.SIGTERM, daemon.stop)
    signal.signal(signal.SIGINT, daemon.stop)
    daemon.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
