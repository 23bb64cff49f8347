"""A network namespace with only the loopback interface, for everything the tests and benchmarks start."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import socket
import struct
from collections.abc import Iterator

__all__ = ["loopback_only_network"]


_CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1


def _bring_loopback_up() -> None:
    """Set the ``lo`` interface of the current network namespace up (like ``ip link set lo up``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14s", b"lo", 0, bytes(14))
        flags = struct.unpack("16sH", fcntl.ioctl(sock, _SIOCGIFFLAGS, request)[:18])[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sH14s", b"lo", flags | _IFF_UP, bytes(14)))


@contextlib.contextmanager
def loopback_only_network() -> Iterator[bool]:
    """Run the block (and every process it starts) in a new network namespace holding only ``lo``.

    Ray replaces ``127.0.0.1`` in a driver's cluster address by the machine's
    "node IP", the address of its default route's interface, so on a machine
    with a network interface a driver would talk to the cluster through that
    interface even though every node was started with
    ``--node-ip-address=127.0.0.1``. In a namespace whose only interface is
    the loopback, Ray finds no such address and keeps to 127.0.0.1, and
    nothing started inside can reach any other host.

    The namespace belongs to the calling thread (pytest's main thread) and is
    inherited by the processes it starts; on exit the thread returns to its
    original namespace. Processes started inside must be stopped before the
    block ends, since nothing outside can reach them.

    Yields
    ------
    bool
        True when the namespace was made; False when the process may not make
        one (not root, or no ``CAP_SYS_ADMIN``): the block then runs in the
        current network, where Ray's traffic may use the machine's own
        interface address.
    """
    try:
        original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    except OSError:
        yield False
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        os.close(original)
        if code in (errno.EPERM, errno.EINVAL, errno.ENOSYS):
            yield False
            return
        raise OSError(code, f"unshare(CLONE_NEWNET): {os.strerror(code)}")
    try:
        _bring_loopback_up()
        yield True
    finally:
        if libc.setns(original, _CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"could not return to the original network namespace: {os.strerror(code)}")
        os.close(original)
