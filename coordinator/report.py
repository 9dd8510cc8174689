"""`intellect-node report STATE_DIR`: PNG plots and a short markdown summary of a run, from the
coordinator's metrics.jsonl and ledger. Reads only; safe on a live run.

Held-out evaluations (metrics lines with "kind": "eval") are drawn beside the training reward, at the
policy step they scored, and summed up first against last."""

from __future__ import annotations

import json
from pathlib import Path

from intellect.coordinator.ledger import Ledger


def _load_metrics(state_dir: Path) -> list[dict]:
    path = state_dir / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path} not found: is {state_dir} a coordinator state dir (it has ledger.sqlite)?")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a crash
    return rows


REPORT_EXTRA = "pip install 'intellect-node[report]'"


def _heldout_lines(evals: list[dict]) -> list[str]:
    if not evals:
        return []
    a, b = evals[0], evals[-1]
    line = (f"- held-out ({b['num_problems']} problems never trained on): greedy {a['heldout_greedy']:.3f} at "
            f"policy {a['policy_step']} -> {b['heldout_greedy']:.3f} at policy {b['policy_step']}; mean@{b['k']} "
            f"(T={b['temperature']:g}) {a['heldout_mean_at_k']:.3f} -> {b['heldout_mean_at_k']:.3f}")
    return [line]


def write_report(state_dir: Path, out_dir: Path | None = None) -> list[Path]:
    try:
        import matplotlib
    except ImportError:
        raise ImportError(f"the report's plots need matplotlib, which is not installed: run `{REPORT_EXTRA}` "
                          "(./install.sh installs it)") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    state_dir = Path(state_dir)
    out_dir = Path(out_dir) if out_dir else state_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = _load_metrics(state_dir)
    metrics = [m for m in lines if m.get("kind") != "eval"]
    evals = sorted((m for m in lines if m.get("kind") == "eval"), key=lambda m: m["policy_step"])
    with Ledger(state_dir / "ledger.sqlite") as ledger:
        nodes = [n for n in ledger.node_table() if n.public_key != "unknown"]
        reasons = ledger.counts_by_reason()
    steps = [m["step"] for m in metrics]
    written = []

    def save(fig, name: str) -> None:
        path = out_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    for key, label, name in (("reward", "mean reward", "reward.png"), ("length", "mean completion tokens",
                                                                     "length.png"), ("step_s", "seconds", "step_time.png")):
        fig, ax = plt.subplots(figsize=(6, 3.2))
        values = [m.get(key, 0.0) for m in metrics]
        ax.plot(steps, values, marker="o", ms=3)
        if key == "reward" and len(values) >= 5:
            smooth = [sum(values[max(0, i - 4): i + 1]) / len(values[max(0, i - 4): i + 1]) for i in range(len(values))]
            ax.plot(steps, smooth, lw=2, label="5-step mean")
        if key == "reward" and evals:
            # policy p has trained p steps: its held-out score sits at x = p, step 0 before any training
            at = [m["policy_step"] for m in evals]
            ax.plot(at, [m["heldout_greedy"] for m in evals], marker="s", ms=4, label="held-out greedy")
            ax.plot(at, [m["heldout_mean_at_k"] for m in evals], marker="^", ms=4,
                    label=f"held-out mean@{evals[-1]['k']}")
        if key == "reward" and (len(values) >= 5 or evals):
            ax.legend()
        ax.set_xlabel("train step")
        ax.set_ylabel(label)
        ax.set_title(f"{label} per step")
        ax.grid(alpha=0.3)
        save(fig, name)

    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = [n.peer_id or n.public_key[:10] for n in nodes]
    ax.bar(names, [n.accepted for n in nodes], label="accepted", color="tab:green")
    ax.bar(names, [n.rejected for n in nodes], bottom=[n.accepted for n in nodes], label="rejected", color="tab:red")
    ax.set_ylabel("submissions")
    ax.set_title("verdicts per node")
    ax.legend()
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right", fontsize=7)
    save(fig, "verdicts.png")

    first = metrics[:5]
    last = metrics[-5:]
    mean = lambda rows, k: sum(r.get(k, 0.0) for r in rows) / max(len(rows), 1)
    lines = [
        f"# Run report: {state_dir}",
        "",
        f"- train steps: {len(metrics)}",
        f"- mean reward, first 5 steps: {mean(first, 'reward'):.3f}; last 5 steps: {mean(last, 'reward'):.3f}",
        f"- mean completion length, first 5: {mean(first, 'length'):.1f}; last 5: {mean(last, 'length'):.1f}",
        (f"- mean step time: {mean(metrics, 'step_s'):.1f} s; wall time: "
         f"{(metrics[-1]['at'] - metrics[0]['at']) if len(metrics) > 1 else 0:.0f} s from first to last step"),
        f"- verdicts: {', '.join(f'{k} {v}' for k, v in sorted(reasons.items())) or 'none'}",
        *_heldout_lines(evals),
        "",
        "| node | accepted | rejected | credit (tokens) | banned |",
        "|---|---|---|---|---|",
        *[f"| {n.peer_id} | {n.accepted} | {n.rejected} | {n.tokens} | {'yes' if n.banned else 'no'} |" for n in nodes],
        "",
        *[f"![{p.stem}]({p.name})" for p in written],
    ]
    summary = out_dir / "summary.md"
    summary.write_text("\n".join(lines) + "\n")
    return written + [summary]
