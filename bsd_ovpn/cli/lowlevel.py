"""The low-level commands that drive an if_ovpn interface as the kernel sees it.

``ovpnctl engine run``, ``interface create|destroy|list|up``, ``start``,
``peer add|del|set|list``, ``key new|swap|del``, ``stats``, ``events`` and
``genkey`` -- the ``wg set`` experience for OpenVPN-protocol tunnels, with
either engine (``--engine kernel|userspace|auto``).  Each command is one
library call; the groups live in small modules imported here so that one
line in ``_commands.py`` registers them all.
"""
from __future__ import annotations

from bsd_ovpn.cli import engine, genkey, interface, key, peer, stats  # noqa: F401
