"""``deft edge controller train | evaluate | demo``: the FedPEAT round controller (PPO) and its baselines.

Exit status 2 with one ``error: ...`` line for bad input (a missing or malformed fleet profile or policy,
an existing ``--out`` without ``--force``, a bad number). ``--json`` prints the result as the last line.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import typer

from device_runtime.errors import DeftError

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="FedPEAT round controller: a PPO policy picks each round's devices, emulators and steps.")

FleetOpt = typer.Option(None, "--fleet-profile", help="Fleet profile JSON (default: the built-in mixed fleet).")


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(2)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _check_positive(**values: int) -> None:
    from edge_broker.controller.fleet import FleetError

    for name, v in values.items():
        if v <= 0:
            raise FleetError(f"--{name.replace('_', '-')} must be a positive number, got {v}")


def _evaluate(policy: Path, fleet_file: Path | None, episodes: int, seed: int) -> dict:
    from edge_broker.controller.baselines import baselines
    from edge_broker.controller.evaluate import compare
    from edge_broker.controller.fleet import load_fleet
    from edge_broker.controller.ppo import load_controller

    ctl = load_controller(policy)
    env = ctl.env() if fleet_file is None else type(ctl.env())(load_fleet(fleet_file), str(ctl.curves))
    if env.action_space != ctl.model.action_space:
        from edge_broker.controller.ppo import PolicyError

        raise PolicyError(f"policy {policy} was trained for {len(ctl.fleet.devices)} devices; the fleet profile "
                          f"has {len(env.devices)}: evaluate it on its own fleet or train one for this fleet")
    _say(f"evaluating {policy} on {episodes} seeded episodes ({len(env.devices)} devices)")
    return compare(env, lambda e, o: ctl.act(o), baselines(seed), episodes, seed=1000 + seed, progress=_say)


def _print_table(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{res['episodes']} episodes, target accuracy {res['target_accuracy']:.0%}")
    for c in ("controller", "mean reward", "95% CI", "time to target", "reached", "final accuracy"):
        t.add_column(c)
    names = ["ppo", *res["baselines"]]
    for n in names:
        mean = res["ppo_reward"] if n == "ppo" else res["baselines"][n]
        ci = res["ppo_reward_ci95"] if n == "ppo" else res["baselines_ci95"][n]
        ttt = res["time_to_target_s"][n]
        t.add_row(n, f"{mean:.2f}", f"[{ci[0]:.2f}, {ci[1]:.2f}]", "-" if ttt is None else f"{ttt:.0f} s",
                  f"{res['target_reached'][n]:.0%}", f"{res['final_accuracy'][n]:.1%}")
    Console(stderr=True).print(t)


@app.command("train")
def train_command(
    fleet_profile: Path = FleetOpt,
    out: Path = typer.Option(..., "--out", help="Policy directory to write."),
    timesteps: int = typer.Option(150_000, help="PPO environment steps (rounds) to train for."),
    seed: int = typer.Option(0, help="Seed of PPO and the environments."),
    curves: Path = typer.Option(None, help="Learning-curve file (default: the kit's measured one)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out."),
    as_json: bool = typer.Option(False, "--json", help="Print the training summary as the last line."),
) -> None:
    """Train the PPO controller on a fleet profile (CPU, minutes; progress on stderr)."""
    from edge_broker.controller.fleet import load_fleet
    from edge_broker.controller.ppo import TrainSettings, train_policy

    try:
        _check_positive(timesteps=timesteps)
        fleet = load_fleet(fleet_profile)
        summary = train_policy(fleet, out, TrainSettings(timesteps=timesteps, seed=seed), force=force,
                               **({"curves": curves} if curves else {}))
    except DeftError as exc:
        raise _fail(exc) from None
    _say(f"policy written to {out} ({summary['timesteps']} steps in {summary['train_s']} s)")
    if as_json:
        typer.echo(json.dumps({"policy": str(out), **summary}))


@app.command("evaluate")
def evaluate_command(
    policy: Path = typer.Option(..., "--policy", help="Policy directory from `deft edge controller train`."),
    fleet_profile: Path = typer.Option(None, "--fleet-profile", help="Default: the fleet the policy was trained on."),
    episodes: int = typer.Option(100, help="Seeded episodes per controller."),
    seed: int = typer.Option(0, help="First episode seed offset (episodes use 1000+seed+i)."),
    as_json: bool = typer.Option(False, "--json", help="Print the comparison as the last line."),
) -> None:
    """PPO against the baselines (full model, largest fitting emulator, random, greedy) on seeded episodes."""
    try:
        _check_positive(episodes=episodes)
        res = _evaluate(policy, fleet_profile, episodes, seed)
    except DeftError as exc:
        raise _fail(exc) from None
    _print_table(res)
    if as_json:
        typer.echo(json.dumps(res))


@app.command("demo")
def demo_command(
    out: Path = typer.Option(Path("deft-controller"), "--out", help="Where the trained policy goes."),
    timesteps: int = typer.Option(150_000, help="PPO environment steps."),
    episodes: int = typer.Option(100, help="Seeded evaluation episodes."),
    as_json: bool = typer.Option(False, "--json", help="Print the evaluation JSON as the last line."),
) -> None:
    """Train a policy on the built-in mixed fleet, then evaluate it against the baselines."""
    from edge_broker.controller.fleet import MIXED_FLEET
    from edge_broker.controller.ppo import TrainSettings, train_policy

    t0 = time.perf_counter()
    try:
        _check_positive(timesteps=timesteps, episodes=episodes)
        summary = train_policy(MIXED_FLEET, out, TrainSettings(timesteps=timesteps), force=True)
        res = _evaluate(out, None, episodes, 0)
    except DeftError as exc:
        raise _fail(exc) from None
    res.update(policy=str(out), train_s=summary["train_s"], wall_s=round(time.perf_counter() - t0, 1))
    _print_table(res)
    if as_json:
        typer.echo(json.dumps(res))
