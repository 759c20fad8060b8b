"""`deft edge allocate` as outside scripts call it: the real console script in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge_broker.allocation import Instance
from edge_broker.allocation.instance import evaluate

DEFT = Path(sys.executable).with_name("deft")

INSTANCE = {
    "devices": [
        {"id": "pi5-1", "flops": 2.0e10, "memory": 4.0e9, "gain": 1e-7, "power": 0.2, "bandwidth": 1.0e6},
        {"id": "pi4-1", "flops": 1.0e10, "memory": 4.0e9, "gain": 1e-9, "power": 0.1, "bandwidth": 2.0e6},
        {"id": "orin-1", "flops": 2.0e11, "memory": 8.0e9, "gain": 1e-10, "power": 0.2, "bandwidth": 1.0e6},
    ],
    "blocks": [
        {"depth": 1, "flops": 1.0e11, "memory": 5.0e8, "update_bytes": 3.0e4},
        {"depth": 2, "flops": 2.0e11, "memory": 6.0e8, "update_bytes": 6.0e4},
    ],
    "total_bandwidth": 1.0e7,
    "noise": 4e-21,
}


def _run(path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(DEFT), "edge", "allocate", str(path), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def instance_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("alloc") / "instance.json"
    p.write_text(json.dumps(INSTANCE))
    return p


@pytest.mark.parametrize("method", ["crunch", "joint", "greedy", "random", "equal"])
def test_json_line_has_the_documented_form(instance_file: Path, method: str) -> None:
    res = _run(instance_file, "--method", method, "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(out) == {"assignment", "bandwidth", "latency"}
    assert [a["depth"] for a in out["assignment"]] == [1, 2]
    assert set(out["bandwidth"]) == {"pi5-1", "pi4-1", "orin-1"}
    inst = Instance.parse(INSTANCE)
    # The printed latency is what the model gives for the printed allocation.
    assignment = {a["depth"]: a["device"] for a in out["assignment"]}
    assert out["latency"] == pytest.approx(evaluate(inst, assignment, out["bandwidth"]), rel=1e-9)
    if method == "crunch":
        assert out["bandwidth"] == {"pi5-1": 1.0e6, "pi4-1": 2.0e6, "orin-1": 1.0e6}
    if method in ("joint", "equal"):
        assert sum(out["bandwidth"].values()) <= INSTANCE["total_bandwidth"] * (1 + 1e-9)


def test_joint_beats_equal_split_here(instance_file: Path) -> None:
    lat = {
        m: json.loads(_run(instance_file, "--method", m, "--json").stdout.splitlines()[-1])["latency"]
        for m in ("joint", "equal", "greedy")
    }
    assert lat["joint"] < lat["equal"] <= lat["greedy"]


def test_human_output(instance_file: Path) -> None:
    res = _run(instance_file)
    assert res.returncode == 0 and "round latency" in res.stdout and "orin-1" in res.stdout


def test_infeasible_exits_nonzero_with_one_line(tmp_path: Path) -> None:
    data = json.loads(json.dumps(INSTANCE))
    data["blocks"][1]["memory"] = 9e9
    p = tmp_path / "i.json"
    p.write_text(json.dumps(data))
    res = _run(p, "--method", "crunch", "--json")
    assert res.returncode == 1
    assert res.stdout == ""
    assert res.stderr.strip().count("\n") == 0
    assert res.stderr.startswith("error: infeasible: block at depth 2 needs 9e+09 B")


@pytest.mark.parametrize(
    "content,needle",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({**INSTANCE, "noise": -1}), "noise"),
        (
            json.dumps({**INSTANCE, "blocks": [INSTANCE["blocks"][1], INSTANCE["blocks"][0]]}),
            "increasing depth",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path: Path, content: str, needle: str) -> None:
    p = tmp_path / "i.json"
    p.write_text(content)
    res = _run(p, "--json")
    assert res.returncode == 2
    assert res.stderr.startswith("error: ") and needle in res.stderr
    assert res.stderr.strip().count("\n") == 0 and "Traceback" not in res.stderr


def test_missing_file(tmp_path: Path) -> None:
    res = _run(tmp_path / "nope.json", "--json")
    assert res.returncode == 2 and "not found" in res.stderr
