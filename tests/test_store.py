"""Coordinator persistence: idempotent updates, one vote per device, atomic aggregates, SIGKILL survival."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from edge_broker.store import Store, StoreError

BUNDLE = "b" * 64


def test_replayed_idempotency_key_is_counted_once(tmp_path):
    with Store(tmp_path / "edge.db") as s:
        s.open_round(1, bundle_hash=BUNDLE)
        assert s.add_update("key-1", round=1, device="dev1", samples=10, payload=b"p1") == "stored"
        # QoS 1 redelivery / a replayed message: same key
        assert s.add_update("key-1", round=1, device="dev1", samples=10, payload=b"p1") == "duplicate_key"
        assert s.add_update("key-1", round=1, device="dev1", samples=999, payload=b"other") == "duplicate_key"
        assert s.count_updates(1) == 1
        assert s.updates(1)[0].samples == 10 and s.updates(1)[0].payload == b"p1"
    with Store(tmp_path / "edge.db") as s:  # and after a restart
        assert s.add_update("key-1", round=1, device="dev1", samples=10, payload=b"p1") == "duplicate_key"
        assert s.count_updates(1) == 1


def test_one_accepted_update_per_device_and_round(tmp_path):
    with Store(tmp_path / "edge.db") as s:
        s.open_round(1, bundle_hash=BUNDLE)
        assert s.add_update("a", round=1, device="dev1", samples=1, payload=b"x") == "stored"
        assert s.add_update("b", round=1, device="dev1", samples=1, payload=b"y") == "device_already_counted"
        assert s.add_update("c", round=1, device="dev1", samples=1, payload=None, accepted=False,
                            reason="non_finite") == "stored"  # rejections are kept for the report
        assert s.add_update("d", round=2, device="dev1", samples=1, payload=b"z") == "stored"
        assert s.count_updates(1) == 1 and s.count_updates(1, accepted=False) == 1
        assert [u.reason for u in s.updates(1, accepted=False)] == ["non_finite"]
        assert s.has_update(1, "dev1") and not s.has_update(1, "dev2")


def test_rounds_globals_and_state_round_trip(tmp_path):
    g0 = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float32)}
    with Store(tmp_path / "edge.db") as s:
        s.save_global(0, g0)
        r = s.open_round(1, bundle_hash=BUNDLE, config={"lr": 1e-3}, deadline=123.0)
        assert (r.status, r.config, r.deadline) == ("open", {"lr": 1e-3}, 123.0)
        assert s.open_round(1, bundle_hash=BUNDLE).started == r.started  # idempotent on restart
        with pytest.raises(StoreError, match="already exists with bundle"):
            s.open_round(1, bundle_hash="c" * 64)
        g1 = {k: v + 1 for k, v in g0.items()}
        s.commit_aggregate(1, g1, result={"accepted": 3}, strategy_state=b"adam-moments")
    with Store(tmp_path / "edge.db") as s:
        n, loaded = s.load_global()
        assert n == 1 and all(np.array_equal(loaded[k], g1[k]) for k in g1)
        assert np.array_equal(s.load_global(0)[1]["a"], g0["a"])
        assert s.round(1).status == "closed" and s.round(1).result == {"accepted": 3}
        assert s.get_state("strategy") == b"adam-moments" and s.latest_round().round == 1


def test_device_registry_and_lost_devices(tmp_path):
    with Store(tmp_path / "edge.db") as s:
        s.upsert_device("pi-1", profile={"board": "rpi5"}, capabilities={"backend": "ort"}, now=100.0)
        s.upsert_device("pi-2", now=100.0)
        assert s.touch_device("pi-2", now=200.0)
        assert not s.touch_device("ghost", now=200.0)
        assert s.mark_lost(silent_for_s=50, now=210.0) == ["pi-1"]
        assert [d.status for d in s.devices()] == ["lost", "online"]
        assert s.device("pi-1").profile == {"board": "rpi5"} and s.device("pi-1").first_seen == 100.0


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path):
    p = tmp_path / "edge.db"
    p.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="cannot open the coordinator database"):
        Store(p)


_WRITER = textwrap.dedent("""
    import os, sys, numpy as np
    from edge_broker.store import Store
    s = Store(sys.argv[1])
    rng = np.random.default_rng(0)
    for i in range(100000):
        r = i // 4 + 1
        s.open_round(r, bundle_hash="b" * 64)
        s.add_update(f"key-{i}", round=r, device=f"dev{i % 4}", samples=i + 1, payload=os.urandom(400_000))
        if i % 4 == 3:
            s.commit_aggregate(r, {"w": rng.normal(size=(256, 256)).astype(np.float32)}, result={"n": 4},
                               strategy_state=os.urandom(100_000))
        print(i, flush=True)
""")


def test_store_survives_sigkill_mid_write(tmp_path):
    db = tmp_path / "edge.db"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(db)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    acked = -1
    deadline = time.monotonic() + 60
    while acked < 40 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        acked = int(line)
    os.kill(proc.pid, signal.SIGKILL)  # while it writes the next update
    proc.wait(10)
    assert acked >= 40, "the writer did not get going"
    with Store(db) as s:
        assert s.integrity_ok()
        rounds = s.rounds()
        keys = {}
        for r in rounds:
            for u in s.updates(r.round):
                keys[u.key] = u
                assert hashlib.sha256(u.payload).hexdigest() == u.payload_sha256  # never half-written
                assert len(u.payload) == 400_000
        assert all(f"key-{i}" in keys for i in range(acked + 1))  # every acknowledged write survived
        assert len(keys) in (acked + 1, acked + 2)  # at most the one in flight also committed
        for r in rounds:  # a round is closed exactly when its global tensors are stored
            assert (r.status == "closed") == (s.load_global(r.round) is not None), r
        closed = [r.round for r in rounds if r.status == "closed"]
        assert len(closed) >= 10 and s.load_global()[0] == max(closed)
        assert s.add_update("key-0", round=1, device="dev0", samples=1, payload=b"") == "duplicate_key"


def test_a_batch_gets_each_item_the_result_it_would_get_alone_in_one_commit(tmp_path):
    from edge_broker.store import NewUpdate

    with Store(tmp_path / "edge.db") as s:
        s.open_round(1, bundle_hash="b" * 64)
        batch = [NewUpdate(key="k1", round=1, device="d1", samples=10, payload=b"one"),
                 NewUpdate(key="k1", round=1, device="d1", samples=10, payload=b"one"),  # replay in the batch
                 NewUpdate(key="k2", round=1, device="d1", samples=10, payload=b"two"),  # second vote of d1
                 NewUpdate(key="k3", round=1, device="d1", samples=0, payload=None, accepted=False,
                           reason="wrong_shape"),  # a rejected one is kept with its reason
                 NewUpdate(key="k4", round=1, device="d2", samples=5, payload=b"four")]
        assert s.add_updates(batch) == ["stored", "duplicate_key", "device_already_counted", "stored", "stored"]
        assert {u.device: u.samples for u in s.updates(1)} == {"d1": 10, "d2": 5}
        assert [u.reason for u in s.updates(1, accepted=False)] == ["wrong_shape"]
        assert s.add_updates([NewUpdate(key="k4", round=1, device="d2", samples=5,
                                        payload=b"four")]) == ["duplicate_key"]
        assert s.count_updates(1) == 2


def test_new_store_uses_large_pages_and_an_old_small_page_store_still_opens(tmp_path):
    import sqlite3

    from edge_broker.store import PAGE_SIZE

    blob = os.urandom(300_000)  # a real-size fp32 LoRA update
    with Store(tmp_path / "new.db") as s:
        assert s._db.execute("PRAGMA page_size").fetchone()[0] == PAGE_SIZE
        s.open_round(1, bundle_hash=BUNDLE)
        assert s.add_update("k", round=1, device="dev1", samples=3, payload=blob) == "stored"
    # a store written by an earlier kit (4 KiB pages, WAL) keeps its pages and its data
    old = tmp_path / "old.db"
    db = sqlite3.connect(old)
    db.execute("PRAGMA page_size=4096")
    db.execute("PRAGMA journal_mode=WAL")
    db.close()
    with Store(old) as s:
        s.open_round(1, bundle_hash=BUNDLE)
        assert s.add_update("k", round=1, device="dev1", samples=3, payload=blob) == "stored"
    with Store(old) as s:
        assert s._db.execute("PRAGMA page_size").fetchone()[0] == 4096
        assert s.updates(1)[0].payload == blob and s.integrity_ok()
    with Store(tmp_path / "new.db") as s:
        assert s.updates(1)[0].payload == blob and s.integrity_ok()
