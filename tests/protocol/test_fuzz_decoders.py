"""Every decoder meets random bytes and mutations of valid encodings. The only allowed outcomes are
the declared rejection (WireRejected) or, for unsigned bodies, a body that passed strict validation;
for signed inputs (envelopes, manifests) any change of meaning must be rejected."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from intellect.protocol.identity import Identity
from intellect.protocol.manifest import (
    ShardStore,
    check_shard,
    open_manifest,
    shard_checkpoint,
    sign_manifest,
)
from intellect.protocol.messages import BODY_TYPES, ShardEntry, decode_body, encode_body
from intellect.protocol.wire import MessageKind, WireRejected, open_envelope, run_id_for, seal

from .test_messages import examples

COORD = Identity.from_seed(b"fuzz-coordinator")
RUN = run_id_for(COORD.public_key, "fuzz")
CASES = 10_000
FUZZ = settings(max_examples=CASES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

VALID_ENVELOPE = seal(COORD, MessageKind.HEARTBEAT, RUN, b"body")


def mutations(valid: bytes):
    """Random bytes, or the valid encoding with flipped/inserted/deleted bytes or truncation."""
    edit = st.tuples(st.integers(0, max(len(valid) - 1, 0)), st.integers(0, 255), st.sampled_from("fid"))

    def apply(edits):
        data = bytearray(valid)
        for pos, byte, op in edits:
            pos = min(pos, len(data))
            if op == "f" and pos < len(data):
                data[pos] ^= byte or 1
            elif op == "i":
                data.insert(pos, byte)
            elif op == "d" and pos < len(data):
                del data[pos]
        return bytes(data)

    return st.one_of(
        st.binary(max_size=512),
        st.lists(edit, min_size=1, max_size=4).map(apply),
        st.integers(0, len(valid)).map(lambda n: valid[:n]),
    )


def expect_rejection_or_valid(decode, data, valid):
    try:
        decode(data)
    except WireRejected:
        return "rejected"
    # msgpack has a few encodings that decode to identical values (e.g. int widths): accept only those
    assert decode(valid) == decode(data) or data == valid
    return "same meaning"


@pytest.mark.slow
@FUZZ
@given(mutations(VALID_ENVELOPE))
def test_fuzz_envelope(data):
    outcome = expect_rejection_or_valid(lambda d: open_envelope(d, run_id=RUN, max_age_s=None), data, VALID_ENVELOPE)
    assert outcome in ("rejected", "same meaning")


@pytest.mark.slow
@pytest.mark.parametrize("model", examples(), ids=lambda m: type(m).__name__)
def test_fuzz_each_message(model):
    valid = encode_body(model)

    @FUZZ
    @given(mutations(valid))
    def run(data):
        try:
            decoded = decode_body(type(model), data)
        except WireRejected:
            return
        assert type(decoded) is type(model)
        assert decode_body(type(model), encode_body(decoded)) == decoded  # a valid body is stable

    run()


@pytest.fixture(scope="module")
def signed_manifest(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ck")
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 40)
    (folder / "config.json").write_bytes(b'{"a": 1}')
    manifest = shard_checkpoint(folder, ShardStore(folder / "store"), run_id=RUN, policy_step=1,
                                model_config_hash="1" * 64, shard_size=4096)
    return sign_manifest(COORD, manifest)


@pytest.mark.slow
def test_fuzz_manifest(signed_manifest):
    @FUZZ
    @given(mutations(signed_manifest))
    def run(data):
        outcome = expect_rejection_or_valid(
            lambda d: open_manifest(d, run_id=RUN, coordinator_key=COORD.public_key), data, signed_manifest)
        assert outcome in ("rejected", "same meaning")

    run()


@pytest.mark.slow
def test_fuzz_shard():
    valid = bytes(range(200))
    import hashlib

    entry = ShardEntry(sha256=hashlib.sha256(valid).hexdigest(), size=len(valid))

    @FUZZ
    @given(mutations(valid))
    def run(data):
        if data == valid:
            check_shard(entry, data)
        else:
            with pytest.raises(WireRejected):
                check_shard(entry, data)

    run()


def test_body_types_cover_every_signed_kind():
    assert set(BODY_TYPES) >= {MessageKind.HEARTBEAT, MessageKind.POLICY_MANIFEST, MessageKind.SUBMISSION,
                               MessageKind.VERDICT}
