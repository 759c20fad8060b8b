"""Train, save and load the PPO round controller (stable-baselines3, ``MultiDiscrete`` actions).

A policy is a directory: ``ppo.zip`` (stable-baselines3's own format), ``curves.json`` (the learning
curves it was trained on, copied so the policy is self-contained) and ``controller.json`` (the fleet
profile and the training settings). It is written to a temporary sibling and renamed: never half-written.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict

from device_runtime.errors import DeftError
from edge_broker.controller.curves import CURVES_FILE, load_curves
from edge_broker.controller.env import FleetEnv
from edge_broker.controller.fleet import FleetProfile


class PolicyError(DeftError, ValueError):
    """A policy directory is missing or damaged, or would overwrite one; the message says the fix."""


class TrainSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: total environment steps of PPO training, and its seed
    timesteps: int = 150_000
    seed: int = 0
    #: parallel environments, and steps each collects per PPO update
    n_envs: int = 8
    n_steps: int = 256
    batch_size: int = 256
    learning_rate: float = 3e-4
    ent_coef: float = 0.01
    gamma: float = 0.99
    net: tuple[int, ...] = (128, 128)


class Controller:
    """A trained policy with the fleet and curves it belongs to."""

    def __init__(self, root: Path, model, fleet: FleetProfile, meta: dict) -> None:
        self.root, self.model, self.fleet, self.meta = root, model, fleet, meta

    @property
    def curves(self) -> Path:
        return self.root / "curves.json"

    def env(self) -> FleetEnv:
        return FleetEnv(self.fleet, str(self.curves))

    def act(self, obs: np.ndarray) -> np.ndarray:
        action, _ = self.model.predict(obs, deterministic=True)
        return np.asarray(action)


def _progress_callback(total: int, show: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from stable_baselines3.common.callbacks import BaseCallback

    class Bar(BaseCallback):
        def _on_training_start(self) -> None:
            self.prog = Progress(TextColumn("[bold]PPO"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("mean episode reward {task.fields[r]}"), TimeRemainingColumn(),
                                 disable=not show, transient=False)
            self.task = self.prog.add_task("ppo", total=total, r="-")
            self.prog.start()

        def _on_step(self) -> bool:
            buf = self.model.ep_info_buffer
            r = f"{np.mean([e['r'] for e in buf]):.2f}" if buf else "-"
            self.prog.update(self.task, completed=self.num_timesteps, r=r)
            return True

        def _on_training_end(self) -> None:
            self.prog.stop()

    return Bar()


def train_policy(fleet: FleetProfile, out: Path, settings: TrainSettings, *, curves: Path = CURVES_FILE,
                 force: bool = False, progress: bool = True) -> dict:
    """Train PPO on ``fleet`` and write the policy directory ``out``; returns the training summary."""
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    if out.exists() and not force:
        raise PolicyError(f"{out} already exists; pass --force to replace it or choose another --out")
    load_curves(curves)  # a missing or malformed file is refused before any training
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    venv = make_vec_env(lambda: FleetEnv(fleet, str(curves)), n_envs=settings.n_envs, seed=settings.seed)
    model = PPO("MlpPolicy", venv, n_steps=settings.n_steps, batch_size=settings.batch_size,
                learning_rate=settings.learning_rate, ent_coef=settings.ent_coef, gamma=settings.gamma,
                policy_kwargs={"net_arch": list(settings.net)}, seed=settings.seed, device="cpu", verbose=0)
    model.learn(total_timesteps=settings.timesteps, callback=_progress_callback(settings.timesteps, progress))
    train_s = time.perf_counter() - t0
    buf = [e["r"] for e in model.ep_info_buffer]
    summary = {"timesteps": int(model.num_timesteps), "train_s": round(train_s, 1),
               "last_mean_episode_reward": float(np.mean(buf)) if buf else None, "settings": settings.model_dump()}
    staging = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save(staging / "ppo.zip")
    shutil.copy(curves, staging / "curves.json")
    (staging / "controller.json").write_text(json.dumps({"fleet": fleet.model_dump(), "training": summary}, indent=1))
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return summary


def load_controller(path: Path) -> Controller:
    """Load a policy directory written by :func:`train_policy`."""
    files = [path / n for n in ("ppo.zip", "curves.json", "controller.json")]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise PolicyError(f"{path} is not a controller policy (missing {', '.join(missing)}); "
                          "train one with `deft edge controller train`")
    from stable_baselines3 import PPO

    try:
        meta = json.loads((path / "controller.json").read_text())
        fleet = FleetProfile.model_validate(meta["fleet"])
        model = PPO.load(path / "ppo.zip", device="cpu")
    except Exception as exc:  # noqa: BLE001 - any damage to the files is one message
        raise PolicyError(f"policy {path} cannot be loaded ({type(exc).__name__}: {exc}); train it again") from None
    return Controller(path, model, fleet, meta)
