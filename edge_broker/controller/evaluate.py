"""Seeded episodes of a policy and of the baselines; mean reward with 95% confidence intervals.

Every policy meets the same episodes: episode ``i`` resets the environment with seed ``seed + i`` and the
availability of the devices is drawn from the environment's generator only, so the comparison is paired.
Confidence intervals: Student t over episodes for each mean, and for PPO minus each baseline (paired).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edge_broker.controller.env import FleetEnv

Act = Callable[[FleetEnv, np.ndarray], np.ndarray]


def run_episode(env: FleetEnv, act: Act, seed: int) -> dict:
    obs, _ = env.reset(seed=seed)
    total, done, info = 0.0, False, {}
    while not done:
        obs, r, done, _, info = env.step(act(env, obs))
        total += r
    return {"reward": total, "time_to_target_s": info.get("time_to_target"), "final_accuracy": env.accuracy,
            "time_s": env.time_used}


def ci95(x: np.ndarray) -> list[float]:
    from scipy import stats

    if len(x) < 2 or float(np.std(x)) == 0.0:
        m = float(np.mean(x))
        return [m, m]
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=float(np.mean(x)), scale=float(stats.sem(x)))
    return [float(lo), float(hi)]


def summarise(runs: list[dict]) -> dict:
    r = np.array([x["reward"] for x in runs])
    ttt = [x["time_to_target_s"] for x in runs if x["time_to_target_s"] is not None]
    return {"mean_reward": float(r.mean()), "reward_ci95": ci95(r),
            "time_to_target_s": float(np.mean(ttt)) if ttt else None,
            "target_reached": len(ttt) / len(runs),
            "final_accuracy": float(np.mean([x["final_accuracy"] for x in runs])),
            "episode_time_s": float(np.mean([x["time_s"] for x in runs]))}


def compare(env: FleetEnv, ppo: Act, baselines: dict[str, Callable[[FleetEnv], np.ndarray]], episodes: int,
            seed: int = 1000, progress: Callable[[str], None] | None = None) -> dict:
    """The evaluate JSON: ``ppo_reward``, ``baselines`` {name: mean reward}, time-to-target for each, CIs."""
    seeds = [seed + i for i in range(episodes)]
    runs = {"ppo": [run_episode(env, ppo, s) for s in seeds]}
    for name, pol in baselines.items():
        if progress:
            progress(f"baseline {name}")
        runs[name] = [run_episode(env, lambda e, _o, p=pol: p(e), s) for s in seeds]
    summ = {k: summarise(v) for k, v in runs.items()}
    ppo_r = np.array([x["reward"] for x in runs["ppo"]])
    diff = {k: ci95(ppo_r - np.array([x["reward"] for x in runs[k]])) for k in baselines}
    return {
        "episodes": episodes, "seeds": [seeds[0], seeds[-1]], "target_accuracy": env.fleet.target_accuracy,
        "ppo_reward": summ["ppo"]["mean_reward"], "ppo_reward_ci95": summ["ppo"]["reward_ci95"],
        "baselines": {k: summ[k]["mean_reward"] for k in baselines},
        "baselines_ci95": {k: summ[k]["reward_ci95"] for k in baselines},
        "ppo_minus_baseline_ci95": diff,
        "ppo_beats_all": all(lo > 0 for lo, _ in diff.values()),
        "time_to_target_s": {k: v["time_to_target_s"] for k, v in summ.items()},
        "target_reached": {k: v["target_reached"] for k, v in summ.items()},
        "final_accuracy": {k: v["final_accuracy"] for k, v in summ.items()},
        "episode_time_s": {k: v["episode_time_s"] for k, v in summ.items()},
    }
