"""Hardware profiles: the built-in files load, every figure is cited, bad files get a clear error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hardware.profiles import (
    BUILTIN_DIR,
    CITED_FIELDS,
    ProfileError,
    builtin_profiles,
    get_profile,
    load_profile,
)

DEFT = Path(sys.executable).with_name("deft")
BOARDS = {
    "jetson-nano-4gb",
    "jetson-xavier-nx",
    "jetson-orin-nano-8gb",
    "jetson-agx-orin-64gb",
    "rpi4-4gb",
    "rpi4-8gb",
    "rpi5-8gb",
    "laptop-x86",
}


def test_builtin_profiles_cover_the_boards_and_cite_every_figure() -> None:
    profiles = builtin_profiles()
    assert set(profiles) == BOARDS
    for p in profiles.values():
        for field in CITED_FIELDS:
            assert len(p.sources[field]) > 20, (p.id, field)
        assert p.flops("cpu") > 1e9 and p.memory_bytes >= 4 * 2**30


def test_relative_figures_are_sane() -> None:
    p = builtin_profiles()
    # Orderings any reader of the data sheets would expect.
    assert p["rpi5-8gb"].flops("cpu") > p["rpi4-4gb"].flops("cpu")
    assert (
        p["jetson-agx-orin-64gb"].flops() > p["jetson-orin-nano-8gb"].flops() > p["jetson-nano-4gb"].flops()
    )
    assert p["rpi4-4gb"].backend() == "cpu" and p["jetson-nano-4gb"].backend() == "gpu"
    assert p["rpi4-8gb"].memory_bytes == 2 * p["rpi4-4gb"].memory_bytes
    with pytest.raises(ProfileError, match="no usable GPU"):
        p["rpi5-8gb"].flops("gpu")


def _write_without(tmp_path: Path, line_start: str) -> Path:
    """The profile without the first line starting with ``line_start`` (the figure, not its citation)."""
    lines = (BUILTIN_DIR / "rpi5-8gb.toml").read_text().splitlines()
    first = next(i for i, ln in enumerate(lines) if ln.startswith(line_start))
    kept = lines[:first] + lines[first + 1 :]
    out = tmp_path / "custom.toml"
    out.write_text("\n".join(kept) + "\n")
    return out


@pytest.mark.parametrize(
    "line,field",
    [
        ("cpu_gflops_fp32 =", "cpu_gflops_fp32"),
        ("memory_bytes =", "memory_bytes"),
        ("tx_power_w =", "uplink.tx_power_w"),
    ],
)
def test_missing_field_is_named(tmp_path: Path, line: str, field: str) -> None:
    with pytest.raises(ProfileError) as err:
        load_profile(_write_without(tmp_path, line))
    msg = str(err.value)
    assert f"missing field '{field}'" in msg and "custom.toml" in msg and "\n" not in msg


def test_missing_citation_is_named(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match=r"sources\.memory_bandwidth_gbs: every figure needs a citation"):
        load_profile(_write_without(tmp_path, 'memory_bandwidth_gbs = "derived'))


def test_bad_values(tmp_path: Path) -> None:
    text = (BUILTIN_DIR / "rpi5-8gb.toml").read_text().replace("cpu_cores = 4", "cpu_cores = 0")
    (tmp_path / "zero.toml").write_text(text)
    with pytest.raises(ProfileError, match="field 'cpu_cores'"):
        load_profile(tmp_path / "zero.toml")
    (tmp_path / "broken.toml").write_text("id = \n")
    with pytest.raises(ProfileError, match="not valid TOML"):
        load_profile(tmp_path / "broken.toml")
    with pytest.raises(ProfileError, match="unknown profile 'pi9'"):
        get_profile("pi9")


def _deft(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(DEFT), "hw", *args], capture_output=True, text=True, timeout=60, check=False)


def test_cli_lists_and_shows() -> None:
    res = _deft("profiles", "--json")
    assert res.returncode == 0, res.stderr
    assert {p["id"] for p in json.loads(res.stdout.splitlines()[-1])} == BOARDS
    res = _deft("profiles", "jetson-orin-nano-8gb", "--json")
    shown = json.loads(res.stdout.splitlines()[-1])
    assert shown["gpu_gflops_fp32"] == 768.0 and "DS-11105-001" in shown["sources"]["memory_bytes"]
    res = _deft("profiles")
    assert res.returncode == 0 and "rpi4-4gb" in res.stdout


def test_cli_bad_profile_file(tmp_path: Path) -> None:
    res = _deft("profiles", str(_write_without(tmp_path, "cpu_cores =")), "--json")
    assert res.returncode == 2
    assert res.stderr.startswith("error: profile file") and "missing field 'cpu_cores'" in res.stderr
    assert "Traceback" not in res.stderr
