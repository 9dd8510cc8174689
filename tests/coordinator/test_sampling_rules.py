"""Coordinator rules of verifiable sampling that need no model: the rows re-run when
toploc_fraction < 1 depend on a secret of the coordinator (not only on the file hash the node
controls), the secret is made once and kept, and the ledger keeps the highest batch counter seen
per (node, policy step)."""

from __future__ import annotations

import hashlib
import stat

from intellect.coordinator.checks import _sample_rows
from intellect.coordinator.intake import row_secret
from intellect.coordinator.ledger import Ledger


def test_rows_to_rerun_depend_on_the_coordinator_secret():
    sha = hashlib.sha256(b"some rollout file").hexdigest()
    a, b = b"\x01" * 32, b"\x02" * 32
    assert _sample_rows(64, sha, 0.25, a) == _sample_rows(64, sha, 0.25, a)
    picks = {tuple(_sample_rows(64, sha, 0.25, bytes([k]) * 32)) for k in range(8)}
    assert len(picks) == 8  # same file, other secrets: other rows
    assert len(_sample_rows(64, sha, 0.25, a)) == 16 and _sample_rows(64, sha, 0.25, a) != _sample_rows(64, sha, 0.25, b)
    assert _sample_rows(64, sha, 1.0, a) == list(range(64))


def test_row_secret_is_made_once_private_and_kept(tmp_path):
    first = row_secret(tmp_path)
    assert len(first) == 32 and row_secret(tmp_path) == first
    assert stat.S_IMODE((tmp_path / "row_secret").stat().st_mode) == 0o600
    assert row_secret(tmp_path / "other") != first


def test_ledger_keeps_the_highest_batch_counter_per_node_and_step(tmp_path):
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        assert ledger.highest_batch_counter("aa", 3) == 0
        for counter in (1, 2, 2, 1):
            ledger.note_batch_counter("aa", 3, counter)
        assert ledger.highest_batch_counter("aa", 3) == 2
        assert ledger.highest_batch_counter("aa", 4) == 0 and ledger.highest_batch_counter("bb", 3) == 0
    with Ledger(tmp_path / "ledger.sqlite") as ledger:  # kept across restarts
        assert ledger.highest_batch_counter("aa", 3) == 2


def test_run_default_tie_tolerance_is_the_protocol_default():
    from intellect.coordinator.rules import IntakeConfig
    from intellect.protocol.sampling import DEFAULT_TIE_TOLERANCE

    assert IntakeConfig().tie_tolerance == DEFAULT_TIE_TOLERANCE
