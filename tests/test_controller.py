"""The FedPEAT round controller: its environment, learning-curve model, penalties, PPO smoke and CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_broker.controller import baselines
from edge_broker.controller.curves import CURVES_FILE, accuracy, advance, fit_curve, load_curves
from edge_broker.controller.env import FleetEnv, encode_choices
from edge_broker.controller.fleet import MIXED_FLEET, FleetDevice, FleetProfile
from edge_broker.controller.rounds_model import Choice

DEFT = Path(sys.executable).with_name("deft")


def _synthetic_curves(path: Path) -> Path:
    """A small curves file in the measured file's format (the environment's tests do not need real runs)."""
    steps = [0, 25, 50, 100, 200]

    def layout(a: float, c: float, rss: float, step_s: float) -> dict:
        acc = [a - (a - 0.5) * np.exp(-s / c) for s in steps]
        return {"peak_rss_mb": rss, "median_step_s": step_s, "trainable_values": 30000,
                "points": [{"steps": s, "accuracy": float(x)} for s, x in zip(steps, acc, strict=True)],
                "fit": fit_curve(steps, acc).model_dump()}

    path.write_text(json.dumps({"method": {"reference_profile": "laptop-x86"}, "layouts": {
        "1,1,1": layout(0.78, 60, 400, 0.3), "1,2,1": layout(0.80, 60, 480, 0.25),
        "1,4,1": layout(0.82, 50, 560, 0.5)}}))
    return path


@pytest.fixture
def curves(tmp_path: Path) -> str:
    return str(_synthetic_curves(tmp_path / "curves.json"))
SMALL = FleetProfile(devices=[FleetDevice(id="pi4", board="rpi4-4gb", memory_budget_mb=300),
                              FleetDevice(id="orin", board="jetson-orin-nano-8gb", memory_budget_mb=4096)],
                     rounds=4)


def test_environment_passes_gymnasiums_checker(curves: str):
    from gymnasium.utils.env_checker import check_env

    check_env(FleetEnv(MIXED_FLEET, curves), skip_render_check=True)


def test_episodes_are_seeded(curves: str):
    env = FleetEnv(MIXED_FLEET, curves)
    runs = []
    for _ in range(2):
        obs, _ = env.reset(seed=7)
        seq = [obs]
        for _ in range(3):
            seq.append(env.step(baselines.greedy(env))[0])
        runs.append(np.stack(seq))
    assert np.array_equal(runs[0], runs[1])


@pytest.mark.skipif(not CURVES_FILE.is_file(), reason="no measured curves: python -m edge_broker.controller.measure")
def test_learning_curves_reproduce_their_measurements():
    doc = json.loads(CURVES_FILE.read_text())
    layouts, ref = load_curves()
    assert ref and {x.layout for x in layouts} == set(doc["layouts"])
    for x in layouts:
        pts = doc["layouts"][x.layout]["points"]
        steps, acc = [p["steps"] for p in pts], np.array([p["accuracy"] for p in pts])
        got = accuracy(x.curve, steps)
        assert np.sqrt(np.mean((got - acc) ** 2)) == pytest.approx(x.curve.rmse, abs=1e-9)
        assert np.max(np.abs(got - acc)) < 0.03, x.layout  # within 3 accuracy points of every measurement
        refit = fit_curve(steps, acc)
        assert accuracy(refit, steps) == pytest.approx(got, abs=1e-4)


def test_advance_follows_the_curve_from_any_accuracy():
    c = fit_curve([0, 25, 50, 100, 200], [0.5, 0.62, 0.7, 0.76, 0.79])
    assert advance(c, float(accuracy(c, 40.0)), 60.0) == pytest.approx(float(accuracy(c, 100.0)))
    assert advance(c, c.a + 0.05, 50.0) < c.a + 0.05  # above the plateau: pulled back down


def test_oversize_emulator_is_penalised(curves: str):
    env = FleetEnv(SMALL, curves)
    env.reset(seed=0)
    env.online[:] = True
    big = len(env.layouts) - 1
    assert not env.devices[0].fits(0, env.layouts)  # 300 MB holds no layout
    choices = [Choice(True, big, 25), Choice(False, 0, 25)]
    _, reward, _, _, info = env.step(encode_choices(choices, SMALL))
    out = info["outcome"]
    assert out.failed == ("pi4",) and out.participants == () and out.gain == 0.0
    assert reward == pytest.approx(-SMALL.reward.failure_penalty - SMALL.reward.latency_price * SMALL.round_overhead_s)
    env.reset(seed=0)
    env.online[:] = True
    _, fine, _, _, _ = env.step(encode_choices([Choice(False, 0, 25), Choice(True, big, 25)], SMALL))
    assert fine > reward


def _deft(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(DEFT), "edge", "controller", *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


def test_ppo_smoke_train_and_evaluate(tmp_path: Path, curves: str):
    fleet = tmp_path / "fleet.json"
    fleet.write_text(SMALL.model_dump_json())
    r = _deft("train", "--fleet-profile", str(fleet), "--out", str(tmp_path / "pol"), "--timesteps", "256",
              "--curves", curves, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["timesteps"] >= 256
    r = _deft("evaluate", "--policy", str(tmp_path / "pol"), "--episodes", "3", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(res["baselines"]) == {"full", "largest_fit", "random", "greedy"}
    assert isinstance(res["ppo_reward"], float) and len(res["ppo_reward_ci95"]) == 2
    assert set(res["time_to_target_s"]) == {"ppo", "full", "largest_fit", "random", "greedy"}
    r = _deft("train", "--fleet-profile", str(fleet), "--out", str(tmp_path / "pol"), "--timesteps", "256",
              "--curves", curves)
    assert r.returncode == 2 and "--force" in r.stderr  # an existing policy is not overwritten


@pytest.mark.parametrize("case", ["missing", "not-json", "bad-field", "unknown-board", "zero-steps", "no-policy",
                                  "no-curves"])
def test_cli_bad_input_is_one_line_exit_2(tmp_path: Path, case: str):
    fleet = tmp_path / "fleet.json"
    docs = {"not-json": "{devices", "bad-field": json.dumps({"devices": [{"id": "a", "board": "rpi4-4gb",
                                                                          "memory_budget_mb": -1}]}),
            "unknown-board": json.dumps({"devices": [{"id": "a", "board": "abacus", "memory_budget_mb": 500}]})}
    if case in docs:
        fleet.write_text(docs[case])
    if case == "zero-steps":
        r = _deft("train", "--out", str(tmp_path / "p"), "--timesteps", "0")
    elif case == "no-curves":
        r = _deft("train", "--out", str(tmp_path / "p"), "--curves", str(tmp_path / "none.json"))
    elif case == "no-policy":
        r = _deft("evaluate", "--policy", str(tmp_path / "nothing"))
    else:
        r = _deft("train", "--fleet-profile", str(fleet), "--out", str(tmp_path / "p"))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert not (tmp_path / "p").exists()


def _manifest(layer_map: list[int], adapters: list[int]):
    from device_runtime.bundle.manifest import EmulatorSpec, Manifest, TensorSpec

    last = len(layer_map) - 1
    trainable = [TensorSpec(name=f"m.encoder.layer.{b}.q.lora_{x}.weight", shape=(2, 2), block=b, kind=f"lora_{x}")
                 for b in (0, last) for x in "AB"] + [TensorSpec(name="m.classifier.weight", shape=(2, 2), kind="head")]
    emu = EmulatorSpec(num_layers_full=6, layer_map=layer_map, adapter_blocks=adapters, is_full=len(layer_map) == 6)
    return Manifest.model_construct(emulator=emu, trainable=trainable)


def test_variant_tensor_names_map_to_the_global_ones_and_back():
    from edge_broker.aggregation import ClientUpdate
    from edge_broker.controller.variants import VariantError, layout_of, name_map, rename_updates

    full, emu = _manifest([0, 1, 2, 3, 4, 5], [0, 5]), _manifest([0, 3, 5], [0, 2])
    assert (layout_of(full), layout_of(emu)) == ("1,4,1", "1,1,1")
    m = name_map(full, emu)
    assert m["m.encoder.layer.5.q.lora_A.weight"] == "m.encoder.layer.2.q.lora_A.weight"
    assert m["m.encoder.layer.0.q.lora_B.weight"] == "m.encoder.layer.0.q.lora_B.weight"
    assert m["m.classifier.weight"] == "m.classifier.weight"
    up = ClientUpdate("pi4", {v: np.ones(1) for v in m.values()}, 10)
    back = rename_updates([up, ClientUpdate("orin", {"x": np.zeros(1)}, 5)], {"pi4": m})
    assert set(back[0].tensors) == set(m) and set(back[1].tensors) == {"x"}
    from device_runtime.bundle.manifest import TensorSpec

    odd = emu.model_copy(update={"trainable": [TensorSpec(name="m.encoder.layer.1.q.lora_A.weight", shape=(2, 2),
                                                          block=1, kind="lora_A")]})
    with pytest.raises(VariantError, match="counterpart"):  # a middle block the global state does not train
        name_map(full, odd)
