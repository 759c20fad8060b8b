"""A federated fleet as real processes: ``deft edge serve`` and ``deft device run`` subprocesses on a
private Mosquitto, for the round tests (kill -9, broker restarts, injected bad updates).

Why subprocesses and not threads: the failures under test are process deaths (SIGKILL, SIGSTOP) and
reconnects, which only mean something across real process and socket boundaries. Everything is on
127.0.0.1, every wait is bounded (``wait_until``), every process this module starts is killed (by its
own pid) at teardown, and the logs of all of them are attached to any failure.

Observation without hooks: the coordinator's SQLite store is read through a read-only connection,
and a device's progress through its work directory (``checkpoints/round-N`` appears when it starts
training, ``sent/round-N.deft`` once it has an update to send).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tests._broker import FLEET, BrokerUnderTest
from tests._models import REPO, SST2_TRAIN

__all__ = ["Fleet", "Proc", "fedavg_from_store", "running_fleet", "store_globals", "store_updates", "write_shard"]

#: the subprocess environment: offline, one thread each (the suite runs on 2 cores next to other work)
_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
}


@dataclass
class Proc:
    """One started ``deft`` process; stdout and stderr go to files so a test can read them at any time."""

    name: str
    popen: subprocess.Popen
    out: Path
    err: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.err.read_text(errors="replace") if self.err.exists() else ""

    def stdout(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    def tail(self, n: int = 40) -> str:
        lines = (self.log() + self.stdout()).splitlines()
        return f"--- {self.name} (pid {self.pid}, rc {self.popen.poll()}) ---\n" + "\n".join(lines[-n:])

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL this process (and only it) and reap it."""
        if self.alive():
            self.popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):  # a SIGKILLed process always dies
            self.popen.wait(10)

    def wait(self, timeout: float) -> int:
        """Wait for a normal exit; fail the test with the log tail if it does not come in time."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running after {timeout:.0f}s\n{self.tail()}") from None

    def result(self) -> dict:
        """The JSON object the process printed as its last stdout line (``--json``)."""
        lines = [ln for ln in self.stdout().splitlines() if ln.strip()]
        assert lines, f"{self.name} printed nothing on stdout\n{self.tail()}"
        return json.loads(lines[-1])


@dataclass
class Fleet:
    """Start coordinator and device processes against one broker and watch them."""

    but: BrokerUnderTest
    bundle: Path
    root: Path
    procs: list[Proc] = field(default_factory=list)

    @property
    def url(self) -> str:
        b = self.but.broker
        return f"mqtt://{b.host}:{b.port}"  # type: ignore[attr-defined]

    @property
    def edge_dir(self) -> Path:
        return self.root / "edge"

    @property
    def db_path(self) -> Path:
        return self.edge_dir / "edge.db"

    def device_dir(self, dev: str) -> Path:
        return self.root / dev

    def _start(self, name: str, args: list[str], password: str) -> Proc:
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        n = sum(1 for p in self.procs if p.name.split("#")[0] == name)
        tag = f"{name}#{n}" if n else name
        out, err = logs / f"{tag}.out", logs / f"{tag}.err"
        env = {**os.environ, **_ENV, "DEFT_PASSWORD": password,
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        with open(out, "wb") as fo, open(err, "wb") as fe:
            popen = subprocess.Popen([sys.executable, "-m", "deftkit.cli", *args], cwd=REPO, env=env,
                                     stdin=subprocess.DEVNULL, stdout=fo, stderr=fe)
        p = Proc(tag, popen, out, err)
        self.procs.append(p)
        return p

    def coordinator(self, *, devices: list[str] | None, rounds: int = 1, min_devices: int = 2,
                    deadline: float = 60.0, steps: int | None = None, epochs: float = 1.0, batch_size: int = 16,
                    lr: float = 1e-3, encoding: str = "int8", eval_data: Path | None = None,
                    extra: list[str] | None = None) -> Proc:
        """``deft edge serve`` with the edge account; the same workdir every time (a restart resumes)."""
        args = ["edge", "serve", "--bundle", str(self.bundle), "--broker", self.url, "--workdir", str(self.edge_dir),
                "--fleet", self.but.fleet, "--rounds", str(rounds), "--min-devices", str(min_devices),
                "--wait-devices", "60", "--deadline", str(deadline), "--epochs", str(epochs),
                "--batch-size", str(batch_size), "--lr", str(lr), "--encoding", encoding, "--json"]
        if devices:
            args += ["--devices", ",".join(devices)]
        if steps:
            args += ["--steps", str(steps)]
        if eval_data is not None:
            args += ["--eval-data", str(eval_data)]
        return self._start("edge", args + list(extra or []), self.but.passwords["edge"])

    def device(self, dev: str, data: Path, *, max_rounds: int | None = None, idle_exit: float = 60.0,
               password: str | None = None, extra: list[str] | None = None) -> Proc:
        """``deft device run`` for account ``dev``; no bundle given, so it downloads it over MQTT."""
        args = ["device", "run", "--broker", self.url, "--id", dev, "--data", str(data), "--fleet", self.but.fleet,
                "--workdir", str(self.device_dir(dev)), "--threads", "1", "--idle-exit", str(idle_exit), "--json"]
        if max_rounds is not None:
            args += ["--max-rounds", str(max_rounds)]
        return self._start(dev, args + list(extra or []), password or self.but.passwords[dev])

    # ---- observation ----------------------------------------------------------------------------
    def logs(self) -> str:
        return "\n".join(p.tail() for p in self.procs)

    def wait_until(self, pred: Callable[[], Any], timeout: float, what: str, *, watch: list[Proc] | None = None,
                   poll: float = 0.05) -> Any:
        """Poll ``pred`` until it returns something truthy; fail (with every log) after ``timeout`` s or as
        soon as a watched process exits."""
        deadline = time.monotonic() + timeout
        while True:
            got = pred()
            if got:
                return got
            dead = [p for p in (watch or []) if not p.alive()]
            if dead:
                raise AssertionError(f"waiting for {what}: {dead[0].name} exited early\n{self.logs()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"waiting for {what}: not within {timeout:.0f}s\n{self.logs()}")
            time.sleep(poll)

    def query(self, sql: str, args: tuple = ()) -> list[tuple]:
        """Read the coordinator's store (read-only; [] while it does not exist yet)."""
        if not self.db_path.exists():
            return []
        try:
            con = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=5)
        except sqlite3.OperationalError:
            return []
        try:
            return con.execute(sql, args).fetchall()
        except sqlite3.OperationalError:  # schema not created yet
            return []
        finally:
            con.close()

    def round_status(self, r: int) -> str | None:
        rows = self.query("SELECT status FROM rounds WHERE round=?", (r,))
        return rows[0][0] if rows else None

    def counted(self, r: int) -> dict[str, int]:
        """device -> number of accepted updates stored for round ``r``."""
        return dict(self.query("SELECT device, COUNT(*) FROM updates WHERE round=? AND accepted=1 GROUP BY device",
                               (r,)))

    def training(self, dev: str, r: int) -> bool:
        """The device has started round ``r``'s training and has not produced its update yet."""
        d = self.device_dir(dev)
        return (d / "checkpoints" / f"round-{r}").exists() and not (d / "sent" / f"round-{r}.deft").exists()

    def report(self) -> dict:
        return json.loads((self.edge_dir / "report" / "report.json").read_text())

    def close(self) -> None:
        for p in self.procs:
            p.kill()


def write_shard(path: Path, start: int, n: int, source: Path = SST2_TRAIN) -> Path:
    """Rows ``start .. start+n`` of an SST-2 TSV (with its header) as a device's local data file."""
    with open(source, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\", lineterminator="\n")
        w.writerow(rows[0])
        w.writerows(rows[1 + start:1 + start + n])
    return path


# ---- reading the store back (what the tests recompute from) --------------------------------------
def store_globals(db: Path) -> dict[int, dict[str, np.ndarray]]:
    from edge_broker.store import tensors_from_bytes

    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {r: tensors_from_bytes(b) for r, b in con.execute("SELECT round, tensors FROM globals ORDER BY round")}
    finally:
        con.close()


def store_updates(db: Path, r: int, accepted: bool = True) -> list[tuple[str, str, int, bytes | None, str | None]]:
    """(key, device, samples, payload, reason) of round ``r``'s stored updates."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [(k, d, s, bytes(p) if p is not None else None, why) for k, d, s, p, why in con.execute(
            "SELECT key, device, samples, payload, reason FROM updates WHERE round=? AND accepted=? ORDER BY device",
            (r, int(accepted)))]
    finally:
        con.close()


def fedavg_from_store(db: Path, r: int) -> tuple[dict[str, np.ndarray], list[str]]:
    """Round ``r``'s global tensors recomputed independently: the previous global plus the
    sample-weighted mean of the stored (decoded) deltas, in float64."""
    from device_runtime.payload import decode_update

    prev = store_globals(db)[r - 1]
    ups = store_updates(db, r)
    total = sum(s for _, _, s, _, _ in ups)
    out = {k: v.astype(np.float64) for k, v in prev.items()}
    for _, dev, samples, payload, _ in ups:
        upd = decode_update(payload)
        assert upd.meta.kind == "delta" and upd.meta.samples == samples and upd.meta.device_id == dev
        for k, d in upd.tensors.items():
            out[k] += samples / total * d.astype(np.float64)
    return out, [d for _, d, _, _, _ in ups]


@contextmanager
def running_fleet(but: BrokerUnderTest, bundle: Path, root: Path) -> Iterator[Fleet]:
    """A place for a coordinator and devices on ``but``; every process started in it is killed on exit.

    Test modules wrap it in a ``fleet`` fixture over ``fresh_mosquitto`` (a private, restartable broker)."""
    assert but.fleet == FLEET
    f = Fleet(but, bundle, root)
    try:
        yield f
    finally:
        f.close()
