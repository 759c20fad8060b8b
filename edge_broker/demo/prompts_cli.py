"""What ``deft demo --scenario prompts`` prints: progress, a table per seed, the JSON summary."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import typer

from device_runtime.errors import DeftError

#: the JSON summary's keys (means over the seeds) besides ``seeds`` and ``pool``
SUMMARY_KEYS = ("own_accuracy", "transfer_accuracy", "ensemble_accuracy", "own_seconds", "transfer_seconds",
                "ensemble_seconds", "pool_bytes", "embedding_mix_accuracy", "embedding_mix_seconds",
                "uniform_ensemble_accuracy", "untrained_accuracy", "newcomer_rows", "pool_devices",
                "rows_per_device", "prompt_tokens", "direct_prompts", "broker", "wall_s")


def prompts_scenario(console, say: Callable[[str], None], json_out: bool, *, workdir: Path, seeds: int,
                     newcomer_rows: int, broker: str, fresh: bool, skew: float) -> None:
    from rich.table import Table

    from edge_broker.demo.prompts import PromptDemoOptions, run_prompt_demo

    opts = PromptDemoOptions(workdir=workdir, seeds=seeds, newcomer_rows=newcomer_rows, broker=broker, fresh=fresh,
                             skew=skew)
    try:
        report = run_prompt_demo(opts, say)
    except KeyboardInterrupt:
        console.print("interrupted: the broker the demo started has been stopped")
        raise typer.Exit(130) from None
    except (DeftError, ValueError, OSError, RuntimeError, TimeoutError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    t = Table(title=f"newcomer with {newcomer_rows} labelled rows (GLUE SST-2 validation, 872 sentences)")
    for c in ("seed", "own", "transfer", "ensemble", "embedding mix", "own s", "ensemble s"):
        t.add_column(c, justify="right")
    for s in report["seeds"]:
        t.add_row(str(s["seed"]), f"{s['own_accuracy']:.4f}", f"{s['transfer_accuracy']:.4f}",
                  f"{s['ensemble_accuracy']:.4f}", f"{s['embedding_mix_accuracy']:.4f}", f"{s['own_seconds']:.1f}",
                  f"{s['ensemble_seconds']:.2f}")
    t.add_row("mean", f"{report['own_accuracy']:.4f}", f"{report['transfer_accuracy']:.4f}",
              f"{report['ensemble_accuracy']:.4f}", f"{report['embedding_mix_accuracy']:.4f}",
              f"{report['own_seconds']:.1f}", f"{report['ensemble_seconds']:.2f}")
    console.print(t)
    console.print(f"pool: {report['pool_devices']} prompts, {report['pool_bytes'] / 1e3:.1f} kB received; "
                  f"wall time {report['wall_s']:.0f}s")
    if json_out:
        summary = {k: report.get(k) for k in SUMMARY_KEYS} | {"seeds": report["seeds"], "pool": report["pool"]}
        sys.stdout.write(json.dumps(summary, default=str) + "\n")
