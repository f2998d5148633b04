"""Imports every command module so that each registers its commands on ``cli``.

One line per module; helpers add their own line and touch nothing else.
"""
from __future__ import annotations
from bsd_ovpn.cli import probe  # noqa: F401
from bsd_ovpn.cli import lowlevel  # noqa: F401
from bsd_ovpn.cli import daemon  # noqa: F401
from bsd_ovpn.cli import demo  # noqa: F401
from bsd_ovpn.cli import service  # noqa: F401
