"""Where bsd_ovpn keeps its run-time files, in one place.

``/var/run`` is the spelling both FreeBSD (which has no ``/run``) and Debian
(where it links to ``/run``) accept, so one default works on every host.
"""
from __future__ import annotations

RUN_DIR = "/var/run/bsd_ovpn"
#: The userspace engine daemon's command socket.
ENGINE_SOCKET = f"{RUN_DIR}/engine.sock"
