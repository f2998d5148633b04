"""bsd_ovpn: OpenVPN-protocol tunnels driven through FreeBSD's if_ovpn(4).

The kernel (or the userspace engine on hosts without if_ovpn) moves data;
this package runs the OpenVPN control channel and drives the data channel
through if_ovpn's nvlist commands.
"""
from __future__ import annotations

__version__ = "0.1.0"
