"""Names and numbers of the FreeBSD if_ovpn(4) control interface.

Everything here is the kernel's contract (sys/net/if_ovpn.h and if_ovpn.c), so
the kernel transport, the userspace engine and the typed API share one
definition.  Values are the LP64 (amd64/arm64) ones.
"""
from __future__ import annotations

import enum


class Command(enum.IntEnum):
    """``ifd_cmd`` values: ``_IO('D', n)``."""

    OVPN_NEW_PEER = 0x20004401
    OVPN_DEL_PEER = 0x20004402
    OVPN_GET_STATS = 0x20004403
    OVPN_NEW_KEY = 0x20004404
    OVPN_SWAP_KEYS = 0x20004405
    OVPN_DEL_KEY = 0x20004406
    OVPN_SET_PEER = 0x20004407
    OVPN_START_VPN = 0x20004408
    OVPN_SEND_PKT = 0x20004409  # removed from the kernel: always ENOTSUP
    OVPN_POLL_PKT = 0x2000440A
    OVPN_GET_PKT = 0x2000440B
    OVPN_SET_IFMODE = 0x2000440C
    OVPN_GET_PEER_STATS = 0x2000440D


#: Commands that go through SIOCGDRVSPEC (the kernel answers with an nvlist).
GET_COMMANDS = frozenset({
    Command.OVPN_GET_STATS, Command.OVPN_POLL_PKT, Command.OVPN_GET_PKT,
    Command.OVPN_GET_PEER_STATS,
})
#: Commands that go through SIOCSDRVSPEC.
SET_COMMANDS = frozenset({
    Command.OVPN_NEW_PEER, Command.OVPN_DEL_PEER, Command.OVPN_NEW_KEY,
    Command.OVPN_SWAP_KEYS, Command.OVPN_DEL_KEY, Command.OVPN_SET_PEER,
    Command.OVPN_START_VPN, Command.OVPN_SET_IFMODE,
})


class NotifType(enum.IntEnum):
    DEL_PEER = 0
    ROTATE_KEY = 1
    FLOAT = 2


class DelReason(enum.IntEnum):
    REQUESTED = 0
    TIMEOUT = 1


class KeySlot(enum.IntEnum):
    PRIMARY = 0
    SECONDARY = 1


#: Cipher names exactly as the kernel compares them (case-sensitive), with the
#: key length userspace must enforce (the kernel does not match length to name).
CIPHER_KEY_SIZES: dict[str, int] = {
    "none": 0,
    "AES-128-GCM": 16,
    "AES-192-GCM": 24,
    "AES-256-GCM": 32,
    "CHACHA20-POLY1305": 32,
}

IMPLICIT_IV_SIZE = 8          # "iv" in a NEW_KEY direction: exactly 8 bytes
MAX_KEY_SIZE = 32             # kernel: longer keys give E2BIG
MAX_REQUEST_SIZE = 4096       # OVPN_MAX_REQUEST_SIZE: larger SET requests give E2BIG
NOTIFICATION_QUEUE_LEN = 32   # buf_ring size; overflow drops new notifications
GET_PKT_BUFSIZE = 4096        # never smaller: ENOSPC on GET_PKT loses the notification
POLL_PKT_BUFSIZE = 128
PEER_STATS_BUFSIZE = 4096     # doubled on ENOSPC
MAX_PEER_ID = 0xFFFFFF        # 24 bits on the wire; 0xFFFFFF means "unset" in the protocol
MAX_KEY_ID = 7
REPLAY_WINDOW = 64            # ovpn_check_replay's bitmap: packets behind the highest seen

IFF_BROADCAST = 0x2
IFF_POINTOPOINT = 0x10
IFF_MULTICAST = 0x8000
IFMODE_P2P = IFF_POINTOPOINT | IFF_MULTICAST      # 0x8010, the default at creation
IFMODE_SUBNET = IFF_BROADCAST | IFF_MULTICAST     # 0x8002, topology subnet (servers)

AF_INET = 2
AF_INET6 = 28                 # FreeBSD's value; Linux uses 10

CLONER_NAME = "openvpn"       # what SIOCIFGCLONERS lists
INTERFACE_PREFIX = "ovpn"     # the cloner accepts any name starting with this

PING_MAGIC = bytes.fromhex("2a187bf3641eb4cb07ed2d0a981fc748")
