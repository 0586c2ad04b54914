"""Typed errors shared by every layer.

Every failure caused by a remote peer is a :class:`PeerFault`. It carries a
``penalty`` (score points taken from the peer) and ``drop`` (close the
connection now). Callers catch ``PeerFault`` at one place per connection,
apply the penalty, and keep the node running; nothing in here ever escapes as a
crash of the daemon.
"""

from __future__ import annotations


class MurmurError(Exception):
    """Base class of all murmur errors."""


class ConfigError(MurmurError):
    """Bad configuration: reported as one line, exit code 2."""


class OptionError(ConfigError):
    """A :class:`ConfigError` blamed on one dotted option (``learning.trainer``).

    Raised by checks that see a loaded config but not where its values came
    from; whoever loaded it (the CLI, the testnet) prefixes the file and line,
    or ``<command line>``, so the user is pointed at what to edit.
    """

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class StateError(MurmurError):
    """A persistent state file is missing, unreadable or inconsistent."""


class StateInUse(StateError):
    """Another daemon holds the state dir's lock. Exit code 2, like a bad
    config: only the operator ends it (stop that daemon, or choose another
    data dir). Under systemd the unit's own old process is gone before its
    new one starts (stop, then start; the cgroup killed), so a holder is a
    daemon outside the unit, and a restart every ``RestartSec`` would only
    re-import torch and fail again, for ever."""


class StateDamaged(StateError):
    """A state file the node cannot run without failed its integrity check
    (the identity key): the node refuses to start rather than run as
    something else. Reported like a config error, one line and exit code 2:
    the operator must restore or remove the file."""


class TrainerError(MurmurError):
    """A trainer broke its contract: a method returned a value of the wrong
    type, shape or range. The message names the method and what was expected
    (see ``murmur.learning.trainers.checked``)."""


class TrainerFailed(TrainerError):
    """The trainer's own code raised (a shape bug on a later batch, the
    user's NaN assertion, CUDA out of memory) and raised again when the node
    tried once more. The message names the trainer, the method, the round and
    the line of the user's code; the original exception is chained."""


class TaskCrashed(MurmurError):
    """A supervised task of the node ended with an exception; the daemon shut
    down (exit code 1) because ``node.keep_serving_after_crash`` is off."""


class TrainerCrashed(TaskCrashed):
    """The node's rounds ended because its trainer failed
    (:class:`TrainerError`: it raised twice running, or broke its contract).
    Exit code 3, which the documented systemd unit does not restart: the same
    code fails the same way after a restart, and each restart re-ran rounds."""


class ConnectionClosed(MurmurError):
    """A connection or stream is closed (by us, by the peer, or after a fault).

    Not a :class:`PeerFault`: a peer hanging up, or resetting a stream, is
    normal. Whoever sent on it learns the message was not delivered; the
    fault that caused a close, if any, went to the host's fault sink.
    """


class PeerFault(MurmurError):
    """Something a remote peer sent or did was wrong.

    ``penalty`` is subtracted from the peer's score; ``drop`` asks the caller to
    close the connection at once.
    """

    penalty: int = 10
    drop: bool = True


class FrameError(PeerFault):
    """A transport frame was malformed (bad length, truncated)."""


class FrameTooLarge(FrameError):
    """A length prefix exceeded the hard maximum; nothing was allocated."""

    penalty = 50


class HandshakeError(PeerFault):
    """The Noise handshake failed or timed out."""


class IdentityMismatch(HandshakeError):
    """The peer proved an identity other than the one we dialled, or its
    static key signature does not verify."""

    penalty = 100


class DecryptError(PeerFault):
    """An AEAD frame failed authentication."""

    penalty = 100


class DecodeError(PeerFault):
    """A message could not be decoded (msgpack, schema, kind, dtype, shape)."""


class SignatureError(PeerFault):
    """A signed object (delta, record) did not verify."""

    penalty = 100


class ReplayError(PeerFault):
    """A signed object was seen before or addressed to somebody else."""

    penalty = 50


class LimitExceeded(PeerFault):
    """A peer exceeded a rate, size or memory limit."""

    penalty = 5
    drop = False


class UnexpectedProtocol(PeerFault):
    """A peer ran a protocol where it has no place (DCUtR on a connection
    that is not relayed): the stream is reset, the connection stays."""

    drop = False


class NegotiationError(PeerFault):
    """multistream-select went wrong: a malformed, oversized or unexpected
    message, or more proposals than the bound allows (an endless ``na`` loop)."""


class NoCommonProtocol(NegotiationError):
    """The peer speaks none of the protocols offered (every proposal got
    ``na``). Not misbehaviour, so no penalty; the channel closes."""

    penalty = 0


class MuxerError(PeerFault):
    """A yamux protocol violation: a bad header, data beyond the receive
    window, a window update past 2^32 - 1, a frame for a stream never opened,
    or a stream flood that went on past the refusals allowed. The session
    sends GoAway (protocol error) and the connection closes."""

    penalty = 20


class StreamRefused(LimitExceeded):
    """The peer opened a stream past the per-connection limits (streams,
    accept backlog, receive memory, open rate): the stream is reset, the
    connection stays."""


class TimeoutFault(PeerFault):
    """A peer did not answer in time (handshake, idle, slow sender)."""

    penalty = 5


class WriteStalled(TimeoutFault):
    """A peer left what we sent it unread: nothing left our send buffer for
    ``transport.drain_timeout_s``. The transport cuts the connection."""


class SendTimeout(TimeoutFault):
    """``send(..., deadline=...)``: the peer had not made room for the
    message by the deadline. Nothing of it was sent and the connection stays
    open (the caller decides; one that stays stalled is cut as
    :class:`WriteStalled`)."""

    drop = False
