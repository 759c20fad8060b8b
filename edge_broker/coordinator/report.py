"""The run report: one JSON file a script can read and one PNG a person can look at."""

from __future__ import annotations

import json
from pathlib import Path

from device_runtime.atomic import atomic_write_text


def write_report(report: dict, out_dir: str | Path) -> tuple[Path, Path | None]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.json"
    atomic_write_text(path, json.dumps(report, indent=2, default=str))
    return path, plot_report(report, out / "report.png")


def plot_report(report: dict, path: Path) -> Path | None:
    """Accuracy, bytes up/down and time per round, side by side."""
    rounds = report.get("rounds") or []
    if not rounds:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["round"] for r in rounds]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    acc = [r.get("accuracy") for r in rounds]
    ax = axes[0]
    if any(a is not None for a in acc):
        ax.plot(([0] if report.get("initial_accuracy") is not None else []) + xs,
                ([report["initial_accuracy"]] if report.get("initial_accuracy") is not None else []) + acc,
                marker="o", label="full model (plug-in)")
        emu = [r.get("bundle_accuracy") for r in rounds]
        if any(a is not None for a in emu):
            ax.plot(xs, emu, marker="s", label="bundle (emulator)")
        ax.legend()
    ax.set(title="accuracy on the evaluation set", xlabel="round", ylabel="accuracy")
    ax.grid(alpha=0.3)
    ax = axes[1]
    w = 0.38
    ax.bar([x - w / 2 for x in xs], [r["bytes_up"] / 1e6 for r in rounds], w, label="up (devices to edge)")
    ax.bar([x + w / 2 for x in xs], [r["bytes_down"] / 1e6 for r in rounds], w, label="down (edge to devices)")
    ax.set_yscale("log")  # the first round carries the bundle download, later ones only adapters
    ax.set(title="bytes per round (log scale)", xlabel="round", ylabel="MB")
    ax.legend()
    ax = axes[2]
    ax.bar(xs, [r["wall_s"] for r in rounds], color="tab:gray")
    ax.set(title="wall time per round", xlabel="round", ylabel="seconds")
    for a in axes:
        a.set_xticks(([0] if a is axes[0] and report.get("initial_accuracy") is not None else []) + xs)
    fig.suptitle(f"deft run: {report.get('fleet', '')} - {report.get('strategy', '')}, {len(rounds)} rounds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
