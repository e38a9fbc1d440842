"""The project's own exception hierarchy.

Modelled on h11: an error is either *ours* (a local misuse or a configuration
problem) or *theirs* (bytes from a peer, the kernel or a file that do not parse).
Any other exception escaping a decoder is a bug, and the fuzz tests check for it.
"""

from __future__ import annotations


class ReplicatorError(Exception):
    """Base class of every error replicator raises on purpose."""


class DecodeError(ReplicatorError):
    """Untrusted bytes (wire frame, netlink message, control request) did not parse."""


class NetlinkDecodeError(DecodeError):
    """A ctnetlink message from the kernel was malformed or truncated."""


class WireDecodeError(DecodeError):
    """A frame or message received from the peer was malformed, too large or invalid."""


class ControlDecodeError(DecodeError):
    """A request on the control socket was malformed."""


class ConfigError(ReplicatorError):
    """The configuration file is invalid; the message names the key."""


class KernelError(ReplicatorError):
    """The kernel refused a request. ``errno`` carries the kernel's error number."""

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


class ChannelError(ReplicatorError):
    """The secure channel to the peer failed (authentication, TLS, framing)."""


class AuthenticationError(ChannelError):
    """The peer could not be authenticated (missing, wrong or unpinned certificate)."""


class ProtocolError(ReplicatorError):
    """The peer violated the sync protocol (after its frames decoded)."""


class ControlError(ReplicatorError):
    """A control-socket command failed; the message is shown to the operator."""


class NotifyDecodeError(DecodeError):
    """A keepalived notify line (``notify`` arguments or ``vrrp_notify_fifo``) was malformed."""


class RoleError(ReplicatorError):
    """The role machine was fed an impossible input (a bug in its caller, like h11's
    ``LocalProtocolError``): e.g. completing an action that is not running."""


class FrameTooLargeError(ChannelError):
    """A payload to send exceeds the frame size bound (a local bug: the sender must split)."""


class WireVersionError(WireDecodeError):
    """The peer's HELLO announced a sync protocol version this node does not speak."""

    def __init__(self, message: str, version: int) -> None:
        super().__init__(message)
        self.version = version
