"""Read and write files in the FAT boot partition of a disk image or SD card without mounting it.

mtools (``mcopy``/``mmd``/``mdir``) does the FAT work at a byte offset into the image, so writing the
first-boot configuration into an image file needs neither root nor a loop device; ``sfdisk --json``
finds the partition. Both are standard Debian packages (mtools, fdisk).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

#: MBR partition types of FAT file systems, and the GPT type GUIDs a FAT boot partition may carry
_FAT_MBR_TYPES = {"1", "4", "6", "b", "c", "e", "ef"}
_FAT_GPT_TYPES = {"C12A7328-F81F-11D2-BA4B-00A0C93EC93B", "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"}


class FatError(RuntimeError):
    """The target has no FAT partition, or an mtools command failed; the message says which."""


def _tool(name: str, package: str) -> str:
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)), None
    )
    if path is None:
        raise FatError(f"{name} not found: install it (apt install {package})")
    return path


def boot_partition_offset(target: str | Path) -> int:
    """Byte offset of the first FAT partition of a disk image or block device."""
    r = subprocess.run(
        [_tool("sfdisk", "fdisk"), "--json", str(target)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if r.returncode != 0:
        raise FatError(
            f"{target} has no readable partition table ({r.stderr.strip() or 'sfdisk failed'}): "
            "is it a Raspberry Pi OS image?"
        )
    table = json.loads(r.stdout)["partitiontable"]
    sector = int(table.get("sectorsize", 512))
    for part in table.get("partitions", []):
        kind = str(part.get("type", "")).lower().removeprefix("0x")
        if kind in _FAT_MBR_TYPES or kind.upper() in _FAT_GPT_TYPES:
            return int(part["start"]) * sector
    raise FatError(f"{target} has no FAT partition: not a Raspberry Pi OS image or SD card")


class FatPartition:
    """The FAT file system at ``offset`` bytes into ``target``; paths are POSIX paths from its root."""

    def __init__(self, target: str | Path, offset: int | None = None) -> None:
        self.target = Path(target)
        self.offset = boot_partition_offset(target) if offset is None else offset
        self._env = {**os.environ, "MTOOLS_SKIP_CHECK": "1", "MTOOLS_NO_VFAT": "0"}

    @property
    def _image(self) -> str:
        return f"{self.target}@@{self.offset}"

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        r = subprocess.run(
            [_tool(tool, "mtools"), "-i", self._image, *args],
            capture_output=True,
            env=self._env,
            timeout=300,
            check=False,
        )
        if check and r.returncode != 0:
            raise FatError(
                f"{tool} {' '.join(args)} on {self.target}: {r.stderr.decode(errors='replace').strip()}"
            )
        return r

    def exists(self, path: str) -> bool:
        return self._run("mdir", "-b", f"::/{path.strip('/')}", check=False).returncode == 0

    def listdir(self, path: str = "") -> list[str]:
        """Names in a directory (not recursive)."""
        out = self._run("mdir", "-b", f"::/{path.strip('/')}").stdout.decode(errors="replace")
        return sorted(Path(line.strip()).name for line in out.splitlines() if line.strip())

    def mkdir(self, path: str) -> None:
        parts = [p for p in path.strip("/").split("/") if p]
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if not self.exists(sub):
                self._run("mmd", f"::/{sub}")

    def read(self, path: str) -> bytes:
        return self._run("mcopy", "-n", f"::/{path.strip('/')}", "-").stdout

    def write(self, path: str, data: bytes | str) -> None:
        """Create or replace one file (parents are created)."""
        parent = path.strip("/").rpartition("/")[0]
        if parent:
            self.mkdir(parent)
        with tempfile.NamedTemporaryFile(prefix="deft-fat-") as tmp:
            tmp.write(data.encode() if isinstance(data, str) else data)
            tmp.flush()
            self._run("mcopy", "-o", "-n", tmp.name, f"::/{path.strip('/')}")

    def copy_in(self, src: Path, path: str) -> None:
        parent = path.strip("/").rpartition("/")[0]
        if parent:
            self.mkdir(parent)
        self._run("mcopy", "-o", "-n", str(src), f"::/{path.strip('/')}")

    def remove(self, path: str) -> None:
        self._run("mdel", f"::/{path.strip('/')}")

    def remove_tree(self, path: str) -> None:
        if self.exists(path):
            self._run("mdeltree", f"::/{path.strip('/')}")
