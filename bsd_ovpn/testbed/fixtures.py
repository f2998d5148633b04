"""pytest fixtures for test hosts (network namespaces / vnet jails), PKI and stock peers.

Loaded by the top-level conftest.py for tests/ and jail-tests/ alike, so
every tier builds its hosts the same way.
"""
from __future__ import annotations
