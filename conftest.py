"""Test tiers, shared by tests/ and jail-tests/.

Tiers are markers: unmarked tests are pure unit tests; ``netns`` tests need
root and the host backend (network namespaces on Linux, vnet jails on
FreeBSD); ``openvpn`` and ``iperf3`` tests need those programs as peers.
Outside CI a missing prerequisite skips the test and says why.  In CI
(``CI=true``) it is an error instead, so a broken install step can never turn
into a silently green run.
"""
from __future__ import annotations

import os
import shutil
import sys

import pytest

pytest_plugins = ["bsd_ovpn.testbed.fixtures"]


def _netns_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces / vnet jails)"
    if sys.platform.startswith("linux"):
        if shutil.which("ip") is None:
            return "needs iproute2's ip command"
        if not os.path.exists("/dev/net/tun"):
            return "needs /dev/net/tun"
        return None
    if sys.platform.startswith("freebsd"):
        if shutil.which("jail") is None:
            return "needs jail(8)"
        return None
    return f"no host backend for {sys.platform}"


def _program_missing(name: str) -> str | None:
    if shutil.which(name) is None:
        return f"needs the {name} program (apt-get install {name})"
    return None


_REASONS: dict[str, str | None] = {}


def pytest_configure(config: pytest.Config) -> None:
    _REASONS.update({
        "netns": _netns_missing(),
        "openvpn": _program_missing("openvpn"),
        "iperf3": _program_missing("iperf3"),
    })


def pytest_runtest_setup(item: pytest.Item) -> None:
    in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    for marker, reason in _REASONS.items():
        if reason is None or item.get_closest_marker(marker) is None:
            continue
        if in_ci:
            pytest.fail(f"CI must provide this tier's prerequisites: {reason}", pytrace=False)
        pytest.skip(reason)
