"""The aarch64 emulation harness: an arm64 Debian Python userland plus aarch64 wheels, run under qemu-user.

``python -m tests.arm.emulator setup`` builds (once, cached under ``.arm/``):

- ``.arm/rootfs``: Debian 12's arm64 ``python3.11`` and the C/C++ runtimes wheels need, extracted by
  ``mmdebstrap --variant=extract`` (no arm64 code runs while building it);
- ``.arm/site``: the aarch64 wheels of the project's core dependencies + its ``device`` extra (read
  from pyproject.toml, markers evaluated for aarch64), with every ``onnxruntime*`` requirement replaced
  by ``onnxruntime==`` :data:`EMULATED_ORT`, plus pytest and pytest-timeout.

Each part carries a stamp of what it was built from, so a second run returns at once and a change
(new extra, new pin) rebuilds only that part. ``python -m tests.arm.emulator pytest ARGS`` runs
``python -m pytest ARGS`` in the repository under ``qemu-aarch64-static``; everything after the
subcommand goes to pytest. Host-only: needs qemu-user-static and mmdebstrap (apt), and ``packaging``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ARM_DIR = REPO / os.environ.get("DEFT_ARM_DIR", ".arm")  # an absolute DEFT_ARM_DIR replaces REPO
SUITE = "bookworm"
#: arm64 Debian packages the userland needs: the interpreter, the C++ runtime (onnxruntime, tokenizers)
#: and OpenMP (numpy/onnxruntime builds that use it)
ROOTFS_PACKAGES = ("python3.11", "libstdc++6", "libgomp1")
PYTHON_VERSION = "3.11"
#: The emulated onnxruntime is pinned, not taken from the `device` extra: 1.22.1's aarch64 wheel imports
#: and trains the MiniLM step graph under Debian 12's qemu-user 7.2, while every release from 1.28.0 on
#: (1.28.0, 1.29.0, 1.30.0, 1.31.1, 1.32.0 tried) segfaults at import there, whatever the -cpu model;
#: 1.23.2, 1.24.4 and 1.27.0 import and run a graph. Raise it with the qemu CI uses, after the suite passes.
EMULATED_ORT = "onnxruntime==1.22.1"
EXTRA_TEST_PACKAGES = ("pytest", "pytest-timeout")
PLATFORMS = ("manylinux_2_28_aarch64", "manylinux2014_aarch64")
#: the environment pyproject markers are evaluated in (what the emulated interpreter would report)
AARCH64_MARKERS = {
    "platform_machine": "aarch64",
    "platform_system": "Linux",
    "sys_platform": "linux",
    "os_name": "posix",
    "python_version": PYTHON_VERSION,
    "python_full_version": f"{PYTHON_VERSION}.2",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}
QEMU = "qemu-aarch64-static"
#: The emulated CPU: a Raspberry Pi 4's core. qemu's default ("max") has SVE, which no board the kit
#: targets has (Pi 4 A72, Pi 5 A76, Jetson Orin A78AE); with it numpy's OpenBLAS picks its SVE kernels,
#: whose emulation raises spurious FP flags ("invalid value encountered in matmul", values correct).
CPU = os.environ.get("DEFT_ARM_CPU", "cortex-a72")
#: bump when the way the parts are built changes, so cached parts are rebuilt
HARNESS_VERSION = 2


class SetupError(RuntimeError):
    """A missing tool or a failed build step, worded as what to do about it."""


# ------------------------------------------------------------------------------- pure: requirements


def _is_onnxruntime(name: str) -> bool:
    return name.lower().replace("_", "-").startswith("onnxruntime")


def device_requirements(pyproject: dict, extra: str = "device") -> list[str]:
    """Core dependencies + ``extra`` (following ``deftkit[...]`` self-references) as aarch64 sees them.

    Any onnxruntime* requirement becomes :data:`EMULATED_ORT` whatever its marker says (the extra may pin
    the x86-only training package); other requirements keep their specifier and are dropped when their
    marker is false on aarch64. pip would evaluate markers for the host, not the ``--platform`` target.
    """
    from packaging.requirements import Requirement

    project = pyproject["project"]
    name = project["name"]
    extras = project.get("optional-dependencies", {})
    out: list[str] = []
    seen_extras: set[str] = set()

    def add(specs: Iterable[str]) -> None:
        for spec in specs:
            req = Requirement(spec)
            if req.name == name:
                for e in sorted(req.extras - seen_extras):
                    seen_extras.add(e)
                    add(extras.get(e, []))
                continue
            if _is_onnxruntime(req.name):
                line = EMULATED_ORT
            elif req.marker is not None and not req.marker.evaluate(AARCH64_MARKERS):
                continue
            else:
                req.marker = None
                line = str(req)
            if line not in out:
                out.append(line)

    add(project.get("dependencies", []))
    seen_extras.add(extra)
    add(extras.get(extra, []))
    return out + [p for p in EXTRA_TEST_PACKAGES if p not in out]


def aarch64_constraints(lines: Iterable[str]) -> list[str]:
    """The repository's constraints without onnxruntime* pins (the emulated one is :data:`EMULATED_ORT`)."""
    from packaging.requirements import InvalidRequirement, Requirement

    keep = []
    for line in lines:
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        try:
            if _is_onnxruntime(Requirement(s).name):
                continue
        except InvalidRequirement:
            continue
        keep.append(s)
    return keep


def stamp_of(*parts: object) -> str:
    return hashlib.sha256(json.dumps([HARNESS_VERSION, *parts], sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------- I/O: build steps


def _need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if not path:
        raise SetupError(f"{tool} not found: install it with `apt-get install {package}`")
    return path


def _built(target: Path, stamp: str) -> bool:
    f = target / ".deft-stamp"
    return f.is_file() and f.read_text() == stamp


def _replace(tmp: Path, target: Path, stamp: str) -> None:
    """Move a finished build into place, so an interrupted build never looks finished."""
    (tmp / ".deft-stamp").write_text(stamp)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)


def build_rootfs(arm_dir: Path = ARM_DIR) -> Path:
    target = arm_dir / "rootfs"
    stamp = stamp_of(SUITE, ROOTFS_PACKAGES)
    if _built(target, stamp):
        return target
    mmdebstrap = _need("mmdebstrap", "mmdebstrap")
    tmp = arm_dir / "rootfs.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [mmdebstrap, "--quiet", "--variant=extract", "--architectures=arm64",
           f"--include={','.join(ROOTFS_PACKAGES)}", SUITE, str(tmp)]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SetupError(f"mmdebstrap failed (needs root or user namespaces, and a Debian mirror):\n{r.stderr[-2000:]}")
    _precompile(tmp / "usr" / "lib" / f"python{PYTHON_VERSION}")
    _replace(tmp, target, stamp)
    return target


def _precompile(directory: Path) -> None:
    """Byte-compile on the host: .pyc files do not depend on the CPU, and compiling the standard library
    under emulation would cost every run minutes (Debian compiles it in a postinst that extract skips)."""
    if sys.version_info[:2] != tuple(map(int, PYTHON_VERSION.split("."))):
        return  # another host Python writes .pyc files the emulated one ignores; it compiles on first use
    import compileall

    compileall.compile_dir(directory, quiet=2, workers=0)


def build_site(arm_dir: Path = ARM_DIR, python: str = sys.executable) -> Path:
    target = arm_dir / "site"
    reqs = device_requirements(tomllib.loads((REPO / "pyproject.toml").read_text()))
    cons = aarch64_constraints((REPO / "constraints.txt").read_text().splitlines())
    stamp = stamp_of(reqs, cons, PLATFORMS, PYTHON_VERSION)
    if _built(target, stamp):
        return target
    tmp = arm_dir / "site.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cons_file = arm_dir / "constraints-aarch64.txt"
    cons_file.write_text("\n".join(cons) + "\n")
    cmd = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
           *(a for p in PLATFORMS for a in ("--platform", p)), "--only-binary=:all:",
           "--python-version", PYTHON_VERSION, "--implementation", "cp", "--target", str(tmp),
           "-c", str(cons_file), *reqs]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SetupError(f"pip could not install the aarch64 wheels {reqs}:\n{r.stderr[-3000:]}")
    _replace(tmp, target, stamp)
    return target


def setup(arm_dir: Path = ARM_DIR) -> tuple[Path, Path]:
    _need(QEMU, "qemu-user-static")
    arm_dir.mkdir(parents=True, exist_ok=True)
    return build_rootfs(arm_dir), build_site(arm_dir)


def emulated_env(site: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the emulated interpreter: aarch64 wheels, then the repository, nothing of the host's."""
    drop = ("PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "LD_LIBRARY_PATH", "LD_PRELOAD")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("QEMU_")}
    env.update({
        "PYTHONPATH": f"{site}{os.pathsep}{REPO}",
        "PYTHONNOUSERSITE": "1",
        "DEFT_DEVICE_ONLY": "1",
        "DEFT_ARM_MACHINE": "aarch64",
        "DEFT_ARM_ORT_VERSION": EMULATED_ORT.split("==")[1],
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    })
    env.update(extra or {})
    return env


def emulated_python(rootfs: Path) -> list[str]:
    """argv prefix of the emulated interpreter. ``-S``: no site module, so the Debian site-packages paths
    (which qemu's ``-L`` would resolve to the HOST's directories when the rootfs lacks them) stay out."""
    return [_need(QEMU, "qemu-user-static"), "-cpu", CPU, "-L", str(rootfs),
            str(rootfs / "usr" / "bin" / f"python{PYTHON_VERSION}"), "-S"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.arm.emulator", description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=("setup", "pytest", "python"))
    ap.add_argument("args", nargs=argparse.REMAINDER, help="arguments for pytest / the emulated python")
    ns = ap.parse_args(argv)
    t0 = time.monotonic()
    try:
        rootfs, site = setup()
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if ns.command == "setup":
        print(f"aarch64 userland ready in {time.monotonic() - t0:.1f} s: {rootfs} + {site}")
        return 0
    cmd = emulated_python(rootfs) + (["-m", "pytest"] if ns.command == "pytest" else []) + ns.args
    return subprocess.run(cmd, check=False, cwd=REPO, env=emulated_env(site)).returncode


if __name__ == "__main__":
    sys.exit(main())
