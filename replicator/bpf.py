"""A classic BPF socket filter that drops netlink messages sent on behalf of one port.

Why: a hot standby writes the peer's whole table into its kernel, and ctnetlink sends
an event of every one of those writes to every listener, the daemon's own event socket
included. The daemon does not need them (its writer says what it wrote, see
:mod:`replicator.mirror`), and receiving each only to drop it cost a system call and
a header check per entry: a fifth of a hot standby's main thread during a burst. The
kernel runs a socket's filter before queueing a multicast message to it
(``do_one_broadcast``), so the filter drops them for the price of three instructions,
nothing queued or copied. conntrackd filters its event socket the same way
(``Filter From Kernelspace``).

The program reads the message header's port id, the first message of each datagram
(the kernel sends one event per datagram): ``nlmsg_pid`` is in host byte order and a
BPF word load is big endian, hence the byte swap of the constant.
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct

#: <asm-generic/socket.h>; Python's socket module does not export them.
SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27

_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K
_INSN = struct.Struct("=HBBI")  # struct sock_filter: code, jt, jf, k
_NLMSG_PID_AT = 12


def drop_portid(portid: int) -> bytes:
    """The program: drop a message whose ``nlmsg_pid`` is ``portid``, keep the rest."""
    # The port id's bytes as they lie in the header, read as the big-endian word the
    # load yields.
    (as_loaded,) = struct.unpack(">I", struct.pack("=I", portid))
    return b"".join(_INSN.pack(*insn) for insn in (
        (_LD_W_ABS, 0, 0, _NLMSG_PID_AT),
        (_JEQ_K, 0, 1, as_loaded),
        (_RET_K, 0, 0, 0),  # drop
        (_RET_K, 0, 0, 0xFFFFFFFF),  # keep, whole
    ))


def attach(sock: socket.socket, program: bytes) -> None:
    """Attach ``program`` to ``sock`` (replacing any filter); the kernel copies it."""
    code = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("@HP", len(program) // _INSN.size, ctypes.addressof(code))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def detach(sock: socket.socket) -> None:
    """Remove ``sock``'s filter, if any."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
    except OSError as exc:
        if exc.errno != errno.ENOENT:  # there was none
            raise
