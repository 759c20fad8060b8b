"""Write a whole OS image to an SD card, safely: removable disks only, say what is overwritten, verify.

The image's mapped ranges (its data, not its holes: ``SEEK_DATA``/``SEEK_HOLE``, the idea behind
bmaptool's block maps) are written, flushed, dropped from the page cache and read back; each range's
SHA-256 must match the image's. ``.xz`` images (how Raspberry Pi OS is published) are decompressed
as a stream and written in full. The first and last MiB of the target are zeroed first, so no old
partition table survives in a hole.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

CHUNK = 4 * 1024 * 1024
WIPE = 1024 * 1024

#: (phase, bytes done, bytes in all or 0 when unknown)
Progress = Callable[[str, int, int], None]


class BlockDeviceError(RuntimeError):
    """The target is not safe to overwrite, or the write did not verify; the message says which."""


@dataclass
class Target:
    path: Path
    kind: str  # "block", "file" or "other"
    size: int
    removable: bool = False
    model: str = ""
    partitions: list[str] = field(default_factory=list)
    mounted: list[str] = field(default_factory=list)

    def describe(self) -> str:
        what = {"block": "block device", "file": "regular file", "other": "not a block device"}[self.kind]
        parts = f"; partitions: {', '.join(self.partitions)}" if self.partitions else ""
        mnt = f"; MOUNTED at {', '.join(self.mounted)}" if self.mounted else ""
        model = f" {self.model}" if self.model else ""
        rm = " removable" if self.removable else ""
        return f"{self.path} ({what}{rm}{model}, {self.size / 1e9:.2f} GB){parts}{mnt}"


def _sys_block(st: os.stat_result) -> Path | None:
    p = Path(f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
    if not p.exists():
        return None
    p = p.resolve()
    return p.parent if (p / "partition").exists() else p  # a partition: judge its disk


def inspect_target(path: str | Path) -> Target:
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise BlockDeviceError(f"{p} does not exist: name the SD card's device (lsblk shows it)") from None
    if stat.S_ISREG(st.st_mode):
        return Target(p, "file", st.st_size)
    if not stat.S_ISBLK(st.st_mode):
        return Target(p, "other", 0)
    sysdir = _sys_block(st)
    removable, model, parts, size = False, "", [], 0
    if sysdir is not None:
        removable = (sysdir / "removable").read_text().strip() == "1"
        if (sysdir / "device" / "model").exists():
            model = (sysdir / "device" / "model").read_text().strip()
        size = int((sysdir / "size").read_text()) * 512
        for child in sorted(sysdir.iterdir()):
            if (child / "partition").exists():
                parts.append(f"/dev/{child.name} ({int((child / 'size').read_text()) * 512 / 1e9:.2f} GB)")
        # an SD slot of a USB card reader reports "removable"; the Pi's own slot (mmcblk) does not
        removable = removable or sysdir.name.startswith("mmcblk") and _is_external_mmc(sysdir)
    names = {f"/dev/{sysdir.name}"} | {x.split(" ")[0] for x in parts} if sysdir else {str(p)}
    mounted = []
    try:
        for line in Path("/proc/self/mounts").read_text().splitlines():
            dev, mnt = line.split()[:2]
            if dev in names:
                mounted.append(f"{dev} on {mnt}")
    except OSError:
        pass
    return Target(p, "block", size, removable, model, parts, mounted)


def _is_external_mmc(sysdir: Path) -> bool:
    """An mmcblk device that is not the disk this machine runs from."""
    try:
        root = os.stat("/").st_dev
        return all(os.major(root) != int(x) for x in [(sysdir / "dev").read_text().split(":")[0]])
    except (OSError, ValueError):
        return False


def check_target(t: Target, *, force: bool) -> None:
    """Refuse anything but an unmounted removable disk unless ``force``."""
    if force:
        return
    if t.kind != "block":
        raise BlockDeviceError(
            f"refusing to write an image to {t.describe()}: not a removable disk "
            "(pass --force if you really mean it)"
        )
    if not t.removable:
        raise BlockDeviceError(
            f"refusing to overwrite {t.describe()}: not a removable disk, it may be a system "
            "disk (pass --force if you really mean it)"
        )
    if t.mounted:
        raise BlockDeviceError(f"refusing to overwrite {t.describe()}: unmount it first (or --force)")


def _ranges(src: Path) -> list[tuple[int, int]]:
    """(start, end) of the data in ``src``, holes left out (the whole file where holes are unsupported)."""
    size = src.stat().st_size
    out: list[tuple[int, int]] = []
    with open(src, "rb") as f:
        fd, pos = f.fileno(), 0
        try:
            while pos < size:
                try:
                    start = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError:  # ENXIO: no more data
                    break
                end = os.lseek(fd, start, os.SEEK_HOLE)
                out.append((start, end))
                pos = end
        except (AttributeError, OSError):
            return [(0, size)]
    return out


def _chunks(src: Path) -> Iterator[tuple[int, bytes]]:
    if src.suffix == ".xz":
        with lzma.open(src, "rb") as f:
            pos = 0
            while block := f.read(CHUNK):
                yield pos, block
                pos += len(block)
        return
    with open(src, "rb") as f:
        for start, end in _ranges(src):
            f.seek(start)
            pos = start
            while pos < end:
                block = f.read(min(CHUNK, end - pos))
                if not block:
                    break
                yield pos, block
                pos += len(block)


def image_size(src: Path) -> int:
    """Bytes to write (0 for .xz: unknown until decompressed)."""
    return 0 if src.suffix == ".xz" else sum(e - s for s, e in _ranges(src))


def write_image(src: str | Path, dest: str | Path, *, on_progress: Progress | None = None) -> dict:
    """Write ``src`` to ``dest`` (already checked), then read every written range back and compare.

    Returns {"bytes": written, "ranges": n, "verified": True}; raises BlockDeviceError on a mismatch."""
    src, dest = Path(src), Path(dest)
    if not src.is_file():
        raise BlockDeviceError(f"OS image {src} not found")
    total = image_size(src)
    report = on_progress or (lambda *_: None)
    digests: list[tuple[int, int, str]] = []
    done = 0
    flags = os.O_WRONLY | (0 if dest.exists() else os.O_CREAT)
    fd = os.open(dest, flags, 0o644)
    try:
        # old partition tables must not survive in the image's holes: zero the first and last MiB
        # (MBR/GPT, and the backup GPT at the end of the disk) before writing
        end = os.lseek(fd, 0, os.SEEK_END)
        for start in {0, max(0, end - WIPE)}:
            os.pwrite(fd, bytes(min(WIPE, end - start)), start)
        for pos, block in _chunks(src):
            os.pwrite(fd, block, pos)
            digests.append((pos, len(block), hashlib.sha256(block).hexdigest()))
            done += len(block)
            report("writing", done, total)
        os.fsync(fd)
        if dest.is_file():
            end = max((p + n for p, n, _ in digests), default=0)
            if os.fstat(fd).st_size < end:
                os.ftruncate(fd, end)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # read back from the medium, not the cache
    finally:
        os.close(fd)
    checked = 0
    fd = os.open(dest, os.O_RDONLY)
    try:
        for pos, n, digest in digests:
            got = os.pread(fd, n, pos)
            if hashlib.sha256(got).hexdigest() != digest:
                raise BlockDeviceError(
                    f"verification failed at byte {pos} of {dest}: the card may be faulty or "
                    "was removed; write it again or use another card"
                )
            checked += n
            report("verifying", checked, total)
    finally:
        os.close(fd)
    return {"bytes": done, "ranges": len(digests), "verified": True}
