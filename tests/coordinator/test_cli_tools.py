"""`intellect-node ledger` and `intellect-node report` on a real ledger and metrics file."""

import json

from typer.testing import CliRunner

from intellect.coordinator.ledger import ACCEPTED, Ledger, Submission, Verdict
from intellect.node.cli import app

A, B = "aa" * 32, "bb" * 32


def make_state(tmp_path):
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        ledger.node_seen(A, "in-alice")
        ledger.node_seen(B, "in-bob")
        ledger.record_submission(Submission("1" * 64, A, 0, 0, 16, 200), Verdict(True, ACCEPTED))
        ledger.record_submission(Submission("2" * 64, B, 0, 0, 16, 180), Verdict(False, "toploc_failed", "chunk 0"))
    lines = [{"step": i, "reward": 0.2 + 0.02 * i, "length": 12.0, "step_s": 5.0, "at": 1000.0 + 10 * i}
             for i in range(12)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in lines) + "\n")
    return tmp_path


def test_ledger_lists_nodes_verdicts_and_bans(tmp_path):
    state = make_state(tmp_path)
    runner = CliRunner()
    shown = runner.invoke(app, ["ledger", str(state)], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert "in-alice" in shown.output and "toploc_failed" in shown.output and "accepted 1" in shown.output
    banned = runner.invoke(app, ["ledger", str(state), "--ban", B, "--reason", "spam"])
    assert banned.exit_code == 0
    with Ledger(state / "ledger.sqlite") as ledger:
        assert ledger.is_banned(B) and ledger.ban_reason(B) == "spam"
    assert runner.invoke(app, ["ledger", str(state), "--unban", B]).exit_code == 0
    with Ledger(state / "ledger.sqlite") as ledger:
        assert not ledger.is_banned(B)
    missing = runner.invoke(app, ["ledger", str(tmp_path / "nowhere")])
    assert missing.exit_code == 1 and "not found" in missing.output


def test_report_writes_plots_and_a_summary(tmp_path):
    state = make_state(tmp_path)
    result = CliRunner().invoke(app, ["report", str(state)])
    assert result.exit_code == 0, result.output
    out = state / "report"
    for name in ("reward.png", "length.png", "step_time.png", "verdicts.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "summary.md").read_text()
    assert "train steps: 12" in summary
    assert "first 5 steps: 0.240; last 5 steps: 0.380" in summary
    assert "in-alice" in summary
