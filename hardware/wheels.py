"""The wheel set a device installs: the kit's own wheel plus its ``device`` extra, built on the edge.

Devices need no internet and no compiler: the edge builds the kit's wheel from this source tree and
lets pip resolve ``deftkit[device]`` for the board's platform and Python (``pip download
--only-binary=:all: --platform ...``), so the set always follows the project's ``device`` extra.
Sets are cached by the kit wheel's hash, platform and Python; the kit wheel is built reproducibly
(``SOURCE_DATE_EPOCH``) so an unchanged tree gives the same set and a provision run that changes
nothing copies nothing.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from hardware.inventory import OS_PYTHON, Device

#: board family -> CPU architecture
_ARCH = {"rpi": "aarch64", "jetson": "aarch64", "laptop": "x86_64"}
#: platform tags pip may pick for a manylinux board, newest first
_TAGS = ("manylinux_2_34_{a}", "manylinux_2_28_{a}", "manylinux_2_17_{a}", "manylinux2014_{a}")
_EPOCH = "315532800"  # 1980-01-01, the earliest time a zip file can hold
ARCHIVE = "wheels.tar"


class WheelError(RuntimeError):
    """The wheel set could not be built; the message has pip's last words."""


def default_cache() -> Path:
    return Path(os.environ.get("DEFT_CACHE") or Path.home() / ".cache" / "deftkit") / "wheels"


def kit_source() -> Path:
    src = Path(__file__).resolve().parents[1]
    if not (src / "pyproject.toml").is_file():
        raise WheelError(
            f"{src} is not a deftkit source tree (no pyproject.toml): provision from a clone of the kit"
        )
    return src


def target_of(dev: Device) -> tuple[str, str]:
    """(architecture, python version) of a device."""
    arch = next((a for fam, a in _ARCH.items() if dev.board.startswith(fam)), platform.machine())
    return arch, OS_PYTHON[dev.os]


def _native(arch: str, py: str) -> bool:
    return arch == platform.machine() and py == f"{sys.version_info.major}.{sys.version_info.minor}"


def _pip(args: list[str], what: str, env: dict[str, str] | None = None) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, **(env or {})},
        check=False,
    )
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        raise WheelError(f"{what} failed: {' / '.join(tail)}")


def build_kit_wheel(out: Path, src: Path | None = None) -> Path:
    """The kit's own (pure Python) wheel, byte-identical for an unchanged source tree."""
    src = src or kit_source()
    out.mkdir(parents=True, exist_ok=True)
    try:
        import setuptools  # noqa: F401  (present: build without fetching a build environment)

        isolation = ["--no-build-isolation"]
    except ImportError:
        isolation = []
    _pip(
        ["wheel", "-q", "--no-deps", *isolation, "-w", str(out), str(src)],
        "building the kit's wheel",
        {"SOURCE_DATE_EPOCH": os.environ.get("SOURCE_DATE_EPOCH", _EPOCH)},
    )
    wheels = sorted(out.glob("deftkit-*.whl"))
    if not wheels:
        raise WheelError(f"pip wheel {src} wrote no deftkit wheel")
    return wheels[-1]


def _requires(kit: Path) -> list[str]:
    """The kit wheel's Requires-Dist lines: what its extras (``device`` among them) resolve from."""
    import zipfile

    with zipfile.ZipFile(kit) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    return sorted(
        line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")
    )


def device_requirements(kit: Path, arch: str, py: str) -> list[str]:
    """The kit's core requirements plus its ``device`` extra, with environment markers evaluated for the
    *board* (pip download --platform would evaluate them for this machine), markers then dropped."""
    from packaging.requirements import Requirement

    env = {
        "platform_machine": arch,
        "python_version": py,
        "python_full_version": f"{py}.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "extra": "device",
    }
    out = []
    for line in _requires(kit):
        r = Requirement(line)
        if r.marker is not None and not r.marker.evaluate(env):
            continue
        extras = f"[{','.join(sorted(r.extras))}]" if r.extras else ""
        out.append(f"{r.name}{extras}{r.specifier}")
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def wheel_set(arch: str, py: str, *, cache: Path | None = None, log=lambda msg: None) -> Path:
    """A directory with the kit wheel, every wheel of its ``device`` extra for (arch, py), pip, and
    ``wheels.tar`` holding them all. Dependencies are resolved once per (requirements, arch, py,
    constraints); a changed kit only swaps its own wheel."""
    cache = cache or default_cache()
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="deft-kit-") as tmp:
        kit = build_kit_wheel(Path(tmp))
        src = kit_source()
        constraints = src / "constraints.txt"
        reqs = device_requirements(kit, arch, py)
        deps_key = hashlib.sha256(
            "\n".join([*reqs, arch, py]).encode()
            + (constraints.read_bytes() if constraints.is_file() else b"")
        ).hexdigest()[:16]
        kit_key = hashlib.sha256(kit.read_bytes()).hexdigest()[:12]
        final = cache / f"{arch}-py{py}-{deps_key}-{kit_key}"
        if (final / ".complete").is_file():
            log(f"wheels for {arch} / Python {py}: cached in {final}")
            return final
        deps = cache / f"deps-{arch}-py{py}-{deps_key}"
        if not (deps / ".complete").is_file():
            log(f"wheels for {arch} / Python {py}: resolving deftkit[device] into {deps}")
            shutil.rmtree(deps, ignore_errors=True)
            deps.mkdir()
            args = ["download", "-q", "--only-binary=:all:", "-d", str(deps)]
            if constraints.is_file():
                args += ["-c", str(constraints)]
            if not _native(arch, py):
                for t in _TAGS:
                    args += ["--platform", t.format(a=arch)]
                args += ["--python-version", py, "--implementation", "cp"]
            _pip([*args, *reqs, "pip"], f"resolving deftkit[device] for {arch} / Python {py}")
            (deps / ".complete").write_text("")
        work = cache / f".{final.name}.partial"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        for w in deps.glob("*.whl"):
            _link_or_copy(w, work / w.name)
        shutil.copy2(kit, work / kit.name)
        _archive(work)
        (work / ".complete").write_text("")
        shutil.rmtree(final, ignore_errors=True)
        work.rename(final)
        return final


def _archive(d: Path) -> Path:
    """``wheels.tar`` of the set, byte-identical for identical wheels (sorted, fixed owner and times), so
    provisioning copies one file and only when it changed."""
    import tarfile

    out = d / ARCHIVE

    def norm(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mtime = int(_EPOCH)
        info.mode = 0o755 if info.isdir() else 0o644
        return info

    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(d, arcname="wheels", recursive=False, filter=norm)
        for w in sorted(d.glob("*.whl")):
            tar.add(w, arcname=f"wheels/{w.name}", filter=norm)
    return out
