"""The fixed controllers PPO is measured against, each ``policy(env) -> action`` on a :class:`FleetEnv`.

- ``full``: every device trains the whole model (largest layout) for the middle step choice, memory or not;
- ``largest_fit``: every device trains the largest layout its memory budget holds, middle step choice;
- ``random``: a uniformly random action (seeded);
- ``greedy``: the largest layout that fits, and per device the most steps that keep its round time
  within the median device's time at the middle step choice (fast devices do more, slow ones less; a
  device that cannot finish the fewest steps in that time sits the round out).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edge_broker.controller.env import FleetEnv, encode_choices
from edge_broker.controller.rounds_model import Choice

Policy = Callable[[FleetEnv], np.ndarray]


def _middle_steps(env: FleetEnv) -> int:
    s = env.fleet.steps
    return 100 if 100 in s else s[len(s) // 2]


def _largest_fit(env: FleetEnv, i: int) -> int | None:
    fits = [v for v in range(len(env.layouts)) if env.devices[i].fits(v, env.layouts)]
    return max(fits) if fits else None


def full(env: FleetEnv) -> np.ndarray:
    k = _middle_steps(env)
    return encode_choices([Choice(True, len(env.layouts) - 1, k) for _ in env.devices], env.fleet)


def largest_fit(env: FleetEnv) -> np.ndarray:
    k = _middle_steps(env)
    out = []
    for i in range(len(env.devices)):
        v = _largest_fit(env, i)
        out.append(Choice(v is not None, v or 0, k))
    return encode_choices(out, env.fleet)


def greedy(env: FleetEnv) -> np.ndarray:
    k = _middle_steps(env)
    layouts = [_largest_fit(env, i) for i in range(len(env.devices))]
    times = [d.round_time(v, k) for d, v in zip(env.devices, layouts, strict=True) if v is not None]
    budget = float(np.median(times)) if times else 0.0
    out = []
    for d, v in zip(env.devices, layouts, strict=True):
        ok = [s for s in env.fleet.steps if v is not None and d.round_time(v, s) <= budget]
        out.append(Choice(bool(ok), v or 0, max(ok) if ok else env.fleet.steps[0]))
    return encode_choices(out, env.fleet)


def make_random(seed: int) -> Policy:
    rng = np.random.default_rng(seed)

    def policy(env: FleetEnv) -> np.ndarray:
        return np.asarray([rng.integers(n) for n in env.action_space.nvec], dtype=np.int64)

    return policy


def baselines(seed: int = 0) -> dict[str, Policy]:
    return {"full": full, "largest_fit": largest_fit, "random": make_random(seed), "greedy": greedy}
