"""multistream-select 1.0 and the uvarint under it: known bytes, both roles, and fuzzing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from murmur.errors import DecodeError, NegotiationError, NoCommonProtocol, PeerFault
from murmur.protocol import uvarint
from murmur.protocol.multistream import (
    MAX_MESSAGE,
    PLAINTEXT_PROTOCOLS,
    PROTOCOL_ID,
    Dialer,
    Lister,
    Listener,
    encode_listing,
    encode_message,
)

# --- uvarint ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "encoded"),
    [(0, b"\x00"), (1, b"\x01"), (127, b"\x7f"), (128, b"\x80\x01"), (255, b"\xff\x01"), (300, b"\xac\x02"),
     (16384, b"\x80\x80\x01"), (2**63 - 1, b"\xff" * 8 + b"\x7f")],
)
def test_uvarint_known_answers(value: int, encoded: bytes) -> None:
    """The multiformats unsigned-varint spec's examples."""
    assert uvarint.encode(value) == encoded
    assert uvarint.decode(encoded) == (value, len(encoded))


@pytest.mark.parametrize("bad", [b"\x80\x00", b"\x81\x80\x00", b"\x80" * 9 + b"\x01", b"\xff" * 10])
def test_uvarint_refuses_non_minimal_and_overlong(bad: bytes) -> None:
    with pytest.raises(DecodeError):
        uvarint.decode(bad)


def test_uvarint_incomplete_is_none_truncated_is_a_fault() -> None:
    assert uvarint.decode_partial(b"\x80\x80") is None
    with pytest.raises(DecodeError, match="truncated"):
        uvarint.decode(b"\x80")
    with pytest.raises(ValueError):
        uvarint.encode(2**63)


@given(st.integers(0, 2**63 - 1))
def test_uvarint_roundtrip(value: int) -> None:
    assert uvarint.decode(uvarint.encode(value)) == (value, len(uvarint.encode(value)))


@given(st.binary(max_size=20))
def test_uvarint_fuzz_only_typed_errors(data: bytes) -> None:
    try:
        uvarint.decode(data)
    except DecodeError:
        pass


# --- multistream: known bytes ----------------------------------------------------


def test_spec_examples_byte_for_byte() -> None:
    """``na`` is 0x036e610a and ``ls`` 0x036c730a (multistream-select README)."""
    assert encode_message("na") == bytes.fromhex("036e610a")
    assert encode_message("ls") == bytes.fromhex("036c730a")
    assert encode_message(PROTOCOL_ID) == b"\x13/multistream/1.0.0\n"


def test_dialer_sends_header_and_first_proposal_in_one_write() -> None:
    dialer = Dialer(["/noise"])
    assert dialer.start() == b"\x13/multistream/1.0.0\n\x07/noise\n"


def _run(dialer: Dialer, listener: Listener) -> None:
    to_listener = dialer.start()
    to_dialer = listener.start()
    for _ in range(50):
        if dialer.done:
            return
        to_dialer += listener.feed(to_listener) if to_listener else b""
        to_listener = dialer.feed(to_dialer) if to_dialer else b""
        to_dialer = b""
    raise AssertionError("negotiation did not finish")


def test_dialer_falls_back_after_na_and_both_agree() -> None:
    dialer = Dialer(["/tls/1.0.0", "/noise"])
    listener = Listener({"/noise"})
    _run(dialer, listener)
    assert dialer.selected == listener.selected == "/noise"
    assert dialer.rejected == ["/tls/1.0.0"]


def test_exchange_matches_the_readme_transcript() -> None:
    """'> /multistream/1.0.0 /ipfs/kad/1.0.0  < /multistream/1.0.0 na  > /ipfs/kad/0.2.3  < /ipfs/kad/0.2.3'."""
    listener = Listener({"/ipfs/kad/0.2.3"})
    out = listener.start() + listener.feed(encode_message(PROTOCOL_ID) + encode_message("/ipfs/kad/1.0.0"))
    assert out == encode_message(PROTOCOL_ID) + encode_message("na")
    assert listener.feed(encode_message("/ipfs/kad/0.2.3") + b"payload") == encode_message("/ipfs/kad/0.2.3")
    assert listener.selected == "/ipfs/kad/0.2.3" and listener.leftover == b"payload"


def test_bytes_after_the_echo_are_the_protocols() -> None:
    dialer = Dialer(["/yamux/1.0.0"])
    dialer.start()
    dialer.feed(encode_message(PROTOCOL_ID) + encode_message("/yamux/1.0.0") + b"\x00\x01rest")
    assert dialer.selected == "/yamux/1.0.0" and dialer.leftover == b"\x00\x01rest"


def test_byte_at_a_time_delivery() -> None:
    listener = Listener({"/a"})
    data = encode_message(PROTOCOL_ID) + encode_message("/a") + b"x"
    out = b"".join(listener.feed(data[i : i + 1]) for i in range(len(data) - 1))
    assert out == encode_message("/a") and listener.leftover == b""
    # The last byte arrives after selection: it is the protocol's, not the negotiator's.
    with pytest.raises(NegotiationError):
        listener.feed(b"x")


def test_ls_both_roles() -> None:
    listener = Listener(["/ipfs/id/1.0.0", "/ipfs/ping/1.0.0"])
    lister = Lister()
    answer = listener.start() + listener.feed(lister.start())
    # README: one message, each protocol a message inside it, then a bare newline.
    inner = encode_message("/ipfs/id/1.0.0") + encode_message("/ipfs/ping/1.0.0") + b"\n"
    assert answer == encode_message(PROTOCOL_ID) + uvarint.encode(len(inner)) + inner
    lister.feed(answer)
    assert lister.protocols == ["/ipfs/id/1.0.0", "/ipfs/ping/1.0.0"]
    assert encode_listing([]) == b"\x01\n"


def test_no_common_protocol_is_typed_and_unpenalised() -> None:
    dialer = Dialer(["/a", "/b"])
    listener = Listener({"/c"})
    with pytest.raises(NoCommonProtocol) as info:
        _run(dialer, listener)
    assert info.value.penalty == 0 and info.value.drop


@pytest.mark.parametrize("plaintext", sorted(PLAINTEXT_PROTOCOLS))
def test_plaintext_is_never_accepted_even_if_registered(plaintext: str) -> None:
    listener = Listener({plaintext, "/noise"})
    listener.start()
    out = listener.feed(encode_message(PROTOCOL_ID) + encode_message(plaintext))
    assert out == encode_message("na") and not listener.done
    assert plaintext not in Lister_listing(listener)


def Lister_listing(listener: Listener) -> list[str]:  # noqa: N802 - helper reads like a query
    lister = Lister()
    lister.feed(encode_message(PROTOCOL_ID) + listener.feed(encode_message("ls")))
    assert lister.protocols is not None
    return lister.protocols


# --- multistream: faults -----------------------------------------------------------


def test_endless_na_loop_ends_with_a_negotiation_error() -> None:
    listener = Listener({"/good"}, max_attempts=8)
    listener.feed(encode_message(PROTOCOL_ID))
    for i in range(8):
        assert listener.feed(encode_message(f"/nope/{i}")) == encode_message("na")
    with pytest.raises(NegotiationError, match="proposals"):
        listener.feed(encode_message("/nope/again"))


def test_ls_requests_count_as_attempts() -> None:
    listener = Listener({"/good"}, max_attempts=3)
    with pytest.raises(NegotiationError):
        listener.feed(encode_message(PROTOCOL_ID) + encode_message("ls") * 4)


def test_oversized_protocol_id_is_refused_from_its_length_prefix() -> None:
    listener = Listener({"/good"})
    # Only the length prefix has arrived: it is judged before the body is awaited.
    with pytest.raises(NegotiationError, match="exceeds"):
        listener.feed(encode_message(PROTOCOL_ID) + uvarint.encode(MAX_MESSAGE + 1))
    with pytest.raises(ValueError):
        encode_message("/" + "x" * MAX_MESSAGE)
    with pytest.raises(ValueError):
        Dialer(["\ud800"])  # a lone surrogate has no UTF-8 encoding


@pytest.mark.parametrize(
    "bad",
    [
        b"\x80" * 10,  # overlong varint
        b"\x80\x00",  # non-minimal varint
        encode_message("/multistream/2.0.0"),  # wrong header
        b"\x03abc",  # no newline
        b"\x03\xff\xfe\n",  # not UTF-8
        b"\x04a\nb\n",  # two lines in one message
    ],
)
def test_malformed_first_message_is_a_negotiation_error(bad: bytes) -> None:
    for role in (Listener({"/a"}), Dialer(["/a"])):
        with pytest.raises(NegotiationError):
            role.feed(bad)


def test_dialer_refuses_an_echo_of_something_else() -> None:
    dialer = Dialer(["/a"])
    dialer.start()
    with pytest.raises(NegotiationError, match="answered"):
        dialer.feed(encode_message(PROTOCOL_ID) + encode_message("/b"))


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.binary(max_size=64), max_size=20), header=st.booleans())
def test_fuzz_listener_only_typed_errors_and_bounded(chunks: list[bytes], header: bool) -> None:
    listener = Listener({"/a", "/b"}, max_attempts=4)
    out_total = 0
    try:
        if header:
            listener.feed(encode_message(PROTOCOL_ID))
        for chunk in chunks:
            if listener.done:
                break
            out_total += len(listener.feed(chunk))
    except PeerFault as fault:
        assert isinstance(fault, NegotiationError)
    # at most one answer per attempt (a listing of two ids is the largest)
    assert out_total <= 4 * len(encode_listing(["/a", "/b"]))
    assert len(listener._reader._buf) <= sum(map(len, chunks))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=20))
def test_fuzz_dialer_only_typed_errors(chunks: list[bytes]) -> None:
    dialer = Dialer(["/a", "/b"])
    dialer.start()
    try:
        for chunk in chunks:
            if dialer.done:
                break
            dialer.feed(chunk)
    except PeerFault as fault:
        assert isinstance(fault, NegotiationError)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(blacklist_characters="\n", blacklist_categories=("Cs",)), min_size=1,
                        max_size=40)
                .filter(lambda t: t not in ("na", "ls")), min_size=1, max_size=6, unique=True),
       st.data())
def test_fuzz_agreement(protocols: list[str], data: st.DataObject) -> None:
    """Any offer/support sets agree on the first offered protocol the listener supports."""
    supported = set(data.draw(st.lists(st.sampled_from(protocols), max_size=len(protocols))))
    dialer, listener = Dialer(protocols), Listener(supported)
    expected = next((p for p in protocols if p in supported and p not in PLAINTEXT_PROTOCOLS), None)
    if expected is None:
        with pytest.raises(NoCommonProtocol):
            _run(dialer, listener)
    else:
        _run(dialer, listener)
        assert dialer.selected == listener.selected == expected
