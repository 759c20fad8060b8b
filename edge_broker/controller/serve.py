"""The PPO controller in a real run (``deft edge serve --controller POLICY --variant LAYOUT=DIR``).

Each round the coordinator asks :meth:`RoundController.round_config`: the policy sees the fleet the way
the environment shows it (which devices said hello and are online, their boards and memory budgets, the
last global accuracy and gain, the predicted time used so far) and picks per device whether it trains,
which emulator variant and how many local steps. A device must be in the policy's fleet profile (by id)
to be chosen. A choice whose layout exceeds the device's memory budget is never sent: the device gets
the largest layout that fits instead and the report records the override (a device no layout fits sits
out). If the policy picks nobody, the fastest online device trains its largest fitting layout for the
fewest steps (a round needs one update). Round times in the observation are the cost model's predictions
for the devices' boards (as in training); the report shows them next to the measured ones.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from device_runtime.bundle.load import Bundle, load_bundle
from device_runtime.errors import DeftError
from edge_broker.controller.env import decode_action, observation
from edge_broker.controller.ppo import load_controller
from edge_broker.controller.rounds_model import Choice, simulate_round
from edge_broker.controller.variants import layout_of, name_map

log = logging.getLogger("deft.edge")


class ControllerError(DeftError, ValueError):
    """The controller cannot run with these bundles; the message names the layout and the fix."""


class RoundController:
    def __init__(self, policy: Path, main: Bundle, variants: dict[str, Path]) -> None:
        self.ctl = load_controller(policy)
        self.env = self.ctl.env()
        self.main = main
        bundles: dict[str, Bundle] = {layout_of(main.manifest): main}
        for layout, path in variants.items():
            b = load_bundle(path)
            if layout_of(b.manifest) != layout:
                raise ControllerError(f"--variant {layout}={path}: that bundle's layout is {layout_of(b.manifest)}")
            bundles[layout] = b
        need = [x.layout for x in self.env.layouts]
        missing = [x for x in need if x not in bundles]
        if missing:
            raise ControllerError(f"the policy chooses among layouts {', '.join(need)} but no bundle is given for "
                                  f"{', '.join(missing)}; pass --variant LAYOUT=BUNDLE_DIR for each")
        self.bundles = {x: bundles[x] for x in need}
        self.names = {x: name_map(main.manifest, b.manifest) for x, b in self.bundles.items() if b is not main}
        n = len(self.env.devices)
        self.accuracy, self.last_gain, self.time_used = self.env.initial_accuracy, 0.0, 0.0
        self.last_s, self.last_took = np.zeros(n), np.zeros(n, dtype=bool)
        self.round = 0
        self._predicted = None

    def set_accuracy(self, accuracy: float | None) -> None:
        if accuracy is not None:
            self.accuracy = float(accuracy)

    def _fit(self, i: int, layout: int) -> int | None:
        fits = [v for v in range(layout, -1, -1) if self.env.devices[i].fits(v, self.env.layouts)]
        return fits[0] if fits else None

    def choose(self, online_ids: set[str]) -> tuple[list[Choice], dict[str, Any]]:
        """The policy's choices for the devices online now, made safe (see the module doc)."""
        env = self.env
        online = np.array([d.id in online_ids for d in env.devices])
        obs = observation(env.devices, env.layouts, env.fleet, online=online, last_s=self.last_s,
                          last_took=self.last_took, round_=self.round, accuracy=self.accuracy,
                          last_gain=self.last_gain, time_used=self.time_used)
        asked = decode_action(self.ctl.act(obs), len(env.devices), env.fleet)
        final, overridden = [], {}
        for i, (d, on, ch) in enumerate(zip(env.devices, online, asked, strict=True)):
            v = self._fit(i, ch.layout) if ch.take_part and on else None
            if v is not None and v != ch.layout:
                overridden[d.id] = {"asked": env.layouts[ch.layout].layout, "given": env.layouts[v].layout}
            final.append(Choice(v is not None, v or 0, ch.steps))
        if not any(c.take_part for c in final):
            cands = [i for i, on in enumerate(online) if on and self._fit(i, len(env.layouts) - 1) is not None]
            if cands:
                i = min(cands, key=lambda j: env.devices[j].step_s[-1])
                final[i] = Choice(True, self._fit(i, len(env.layouts) - 1), env.fleet.steps[0])
        return final, {"asked": [c.__dict__ for c in asked], "overridden": overridden}

    def round_config(self, online_ids: list[str], base_hyperparams: dict[str, Any]) -> dict[str, Any]:
        """The round's stored config: who trains which variant bundle for how many steps, and why."""
        env = self.env
        choices, extra = self.choose(set(online_ids))
        online = np.array([d.id in online_ids for d in env.devices])
        predicted = simulate_round(env.devices, env.layouts, env.fleet, self.accuracy, online, choices)
        hp = {k: v for k, v in base_hyperparams.items() if k != "epochs"}
        sel, variants, hyper, names, report = [], {}, {}, {}, {}
        for d, c, on in zip(env.devices, choices, online, strict=True):
            if not (c.take_part and on):
                continue
            layout = env.layouts[c.layout].layout
            sel.append(d.id)
            if self.bundles[layout] is not self.main:
                variants[d.id] = str(self.bundles[layout].root)
                names[d.id] = self.names[layout]
            hyper[d.id] = {**hp, "steps": c.steps, "schedule": "constant"}
            report[d.id] = {"layout": layout, "steps": c.steps, "board": d.board,
                            "memory_budget_mb": d.memory_budget_mb,
                            "layout_peak_rss_mb": env.layouts[c.layout].peak_rss_mb,
                            "predicted_s": round(predicted.device_s.get(d.id, 0.0), 2)}
            log.info("controller: %s trains %s for %d steps (predicted %.1f s on %s)", d.id, layout, c.steps,
                     predicted.device_s.get(d.id, 0.0), d.board)
        self._predicted = predicted
        return {"selected": sel, "variants": variants, "hyperparams": hyper, "tensor_names": names,
                "controller": {"choices": report, "offline": [d.id for d, on in zip(env.devices, online, strict=True)
                                                              if not on],
                               "predicted_latency_s": round(predicted.latency_s, 2), **extra}}

    def observe(self, accuracy: float | None) -> None:
        """After the round closed: the measured accuracy and the predicted times move the state on."""
        p = self._predicted
        if p is None:  # a round opened before a restart: only the accuracy is known
            self.set_accuracy(accuracy)
            self.round += 1
            return
        new = self.accuracy + p.gain if accuracy is None else float(accuracy)
        self.last_gain, self.accuracy = new - self.accuracy, new
        self.time_used += p.latency_s
        self.last_s = np.array([p.device_s.get(d.id, 0.0) for d in self.env.devices])
        self.last_took = np.array([d.id in p.participants for d in self.env.devices])
        self.round += 1
