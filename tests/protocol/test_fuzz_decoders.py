"""Every decoder meets random bytes and mutations of valid encodings. The only allowed outcomes are
the declared rejection (WireRejected) or, for unsigned bodies, a body that passed strict validation;
for signed inputs (envelopes, manifests) any change of meaning must be rejected.

10,000 seeded cases per decoder, from a plain `random.Random` (the same cases every run): hypothesis
drew the same kinds of input at ~3 ms a case, 30 s a decoder, all of it its own engine's cost. A
failure names the case's index and bytes, which reproduce it."""

import hashlib
import random
from collections import Counter
from collections.abc import Callable, Iterator

import pytest

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

VALID_ENVELOPE = seal(COORD, MessageKind.HEARTBEAT, RUN, b"body")


def mutations(valid: bytes, seed: int = 0, cases: int = CASES) -> Iterator[bytes]:
    """Random bytes, or the valid encoding with 1-4 flipped/inserted/deleted bytes, or a truncation."""
    rng = random.Random(seed)
    for _ in range(cases):
        shape = rng.randrange(3)
        if shape == 0:
            yield rng.randbytes(rng.randint(0, 512))
        elif shape == 1:
            data = bytearray(valid)
            for _ in range(rng.randint(1, 4)):
                pos, byte, op = rng.randint(0, len(data)), rng.randrange(256), rng.choice("fid")
                if op == "f" and pos < len(data):
                    data[pos] ^= byte or 1
                elif op == "i":
                    data.insert(pos, byte)
                elif op == "d" and pos < len(data):
                    del data[pos]
            yield bytes(data)
        else:
            yield valid[:rng.randint(0, len(valid))]


def fuzz(valid: bytes, check: Callable[[bytes], str]) -> Counter:
    """Run `check` on every case and count its outcomes; a failure says which case, with its bytes."""
    outcomes: Counter = Counter()
    for i, data in enumerate(mutations(valid)):
        try:
            outcomes[check(data)] += 1
        except Exception as e:
            raise AssertionError(f"case {i}: {data!r}") from e
    assert outcomes.total() == CASES
    return outcomes


def assert_mostly_rejected(outcomes: Counter) -> None:
    """Nearly every mutation changes a signed input's meaning: a decoder accepting most is not checking."""
    assert set(outcomes) <= {"rejected", "same meaning"}, outcomes
    assert outcomes["rejected"] > 0.9 * CASES, outcomes


def expect_rejection_or_valid(decode, data, valid):
    try:
        decode(data)
    except WireRejected:
        return "rejected"
    # msgpack has a few encodings that decode to identical values (e.g. int widths): accept only those
    assert decode(valid) == decode(data) or data == valid
    return "same meaning"


def test_mutations_are_seeded_and_varied():
    first = list(mutations(VALID_ENVELOPE, seed=1, cases=300))
    assert first == list(mutations(VALID_ENVELOPE, seed=1, cases=300))
    assert first != list(mutations(VALID_ENVELOPE, seed=2, cases=300)) and len(set(first)) > 250
    edits = [d for d in first if d != VALID_ENVELOPE and d[:8] == VALID_ENVELOPE[:8]]  # edits and truncations
    assert len(edits) > 100 and any(len(d) > len(VALID_ENVELOPE) for d in edits)
    assert any(len(d) < len(VALID_ENVELOPE) // 2 for d in edits)


@pytest.mark.slow
def test_fuzz_envelope():
    assert_mostly_rejected(fuzz(VALID_ENVELOPE, lambda data: expect_rejection_or_valid(
        lambda d: open_envelope(d, run_id=RUN, max_age_s=None), data, VALID_ENVELOPE)))


@pytest.mark.slow
@pytest.mark.parametrize("model", examples(), ids=lambda m: type(m).__name__)
def test_fuzz_each_message(model):
    valid = encode_body(model)

    def check(data):
        try:
            decoded = decode_body(type(model), data)
        except WireRejected:
            return "rejected"
        assert type(decoded) is type(model)
        assert decode_body(type(model), encode_body(decoded)) == decoded  # a valid body is stable
        return "valid"

    outcomes = fuzz(valid, check)
    assert outcomes["rejected"] > CASES // 2 and outcomes["valid"] >= 1, outcomes  # the valid body itself is among the truncations


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
    assert_mostly_rejected(fuzz(signed_manifest, lambda data: expect_rejection_or_valid(
        lambda d: open_manifest(d, run_id=RUN, coordinator_key=COORD.public_key), data, signed_manifest)))


@pytest.mark.slow
def test_fuzz_shard():
    valid = bytes(range(200))
    entry = ShardEntry(sha256=hashlib.sha256(valid).hexdigest(), size=len(valid))

    def check(data):
        if data == valid:
            check_shard(entry, data)
            return "valid"
        with pytest.raises(WireRejected):
            check_shard(entry, data)
        return "rejected"

    outcomes = fuzz(valid, check)
    assert outcomes["rejected"] > 0.9 * CASES and outcomes["valid"] >= 1, outcomes


def test_body_types_cover_every_signed_kind():
    assert set(BODY_TYPES) >= {MessageKind.HEARTBEAT, MessageKind.POLICY_MANIFEST, MessageKind.SUBMISSION,
                               MessageKind.VERDICT}
