"""``deft demo --scenario prompts``: a prompt pool over MQTT, and a newcomer that uses it.

1. export MiniLM with a soft prompt + head and the prompt-ensemble step graph (cached in the workdir);
2. pool devices train prompt + head on their own non-IID SST-2 shards (the device runtime, no torch),
   each says hello and publishes its prompt (with its held-out accuracy and label counts) to the
   edge, which validates it, stores it in SQLite and serves it retained on ``all/prompts/<id>``;
   the first pool device also sends its prompt straight to the newcomer (``prompt-to``);
3. a newcomer with only N labelled rows subscribes, receives the pool (bytes counted), and per seed
   compares on the 872 GLUE validation sentences: (a) its own prompt + head trained from scratch on
   its N rows, (b) the same training started from the pool prompt that transfers best to its rows
   (lowest loss there), (c) the on-the-fly ensemble of the K frozen pool prompts, only K mixing
   weights tuned (probability space; the embedding-space mix through the step graph is measured
   next to it).
"""

from __future__ import annotations

import random
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_broker.demo.run import FLEET, ScenarioOptions, _minilm, reusable_bundle
from edge_broker.demo.shards import label_skewed_shards, read_labelled_tsv, write_tsv

Say = Callable[[str], None]


@dataclass
class PromptDemoOptions(ScenarioOptions):
    """The prompts demo (`deft demo --scenario prompts`)."""

    #: the pool: devices, each with its shard, training prompt + head. It needs a high learning rate on
    #: MiniLM: 1e-1, chosen on a dev split of training rows no device uses (64 rows, 10 epochs: 0.50 at
    #: 1e-2, 0.64 at 1e-1), never on the validation set
    pool_devices: int = 4
    rows_per_device: int = 1000
    pool_epochs: float = 2.0
    pool_lr: float = 1e-1
    prompt_tokens: int = 20
    workdir: Path = Path("deft-demo-prompts")
    #: the newcomer: its labelled rows, its own training (same lr and epochs for own and transfer), the
    #: mixing weights' lr, and how many seeds repeat the comparison
    newcomer_rows: int = 64
    newcomer_epochs: float = 10.0
    newcomer_lr: float = 1e-1
    mix_lr: float = 0.05
    seeds: int = 3
    #: ONNX Runtime threads of each training process (None: its default)
    threads: int | None = None


def export_prompt_bundle(opts: PromptDemoOptions, say: Say) -> Path:
    from export import export_bundle

    out = opts.workdir / f"bundle-prompt{opts.prompt_tokens}-pool{opts.pool_devices}"
    if reusable_bundle(out, say):
        return out
    source = opts.model or _minilm()
    say(f"exporting {source}: soft prompt ({opts.prompt_tokens} tokens) + head, and the prompt-ensemble step "
        f"graph over {opts.pool_devices} pool prompts (a few minutes)")
    t0 = time.perf_counter()
    export_bundle(source, out, task="seq-cls", num_labels=2, max_length=64, peft="prompt",
                  num_virtual_tokens=opts.prompt_tokens, prompt_pool=opts.pool_devices)
    say(f"exported {out} in {time.perf_counter() - t0:.0f}s")
    return out


def _split_rows(opts: PromptDemoOptions) -> tuple[list[str], list[list[dict]], list[dict]]:
    """Pool shards (non-IID) and the rows no pool device has (where newcomers draw theirs from)."""
    fields, rows = read_labelled_tsv(opts.train_data)
    shards = label_skewed_shards(rows, opts.pool_devices, opts.rows_per_device, skew=opts.skew, seed=0)
    used = {id(r) for s in shards for r in s}
    return fields, shards, [r for r in rows if id(r) not in used]


def _connect(url: str, user: str, password: str, mps: int | None):
    from device_runtime.protocol.client import DeftClient

    return DeftClient.from_url(url, client_id=f"{user}-prompts", username=user, password=password,
                               max_packet_size=mps).connect(timeout=30)


def _hello(client, topics, device: str) -> None:
    from deftkit import __version__
    from device_runtime.protocol import Hello, to_envelope

    client.publish(topics.hello(device), to_envelope(Hello(kit_version=__version__), sender=device,
                                                     fleet=topics.fleet), retain=True)


def _ack(q, key: str, timeout: float) -> dict:
    """The edge's acknowledgement of message ``key`` (bounded wait)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = q.get(timeout=max(0.05, deadline - time.monotonic()))
        except Exception:  # noqa: BLE001 - queue.Empty
            break
        body = got.envelope.json()
        if body.get("ack") == key:
            return body
    raise TimeoutError(f"no acknowledgement of prompt {key} within {timeout:.0f}s")


def train_pool_device(bundle, name: str, shard_path: Path, opts: PromptDemoOptions):
    """One pool device: train prompt + head on 90% of its shard, score on the other 10%; its payload."""
    from device_runtime.data import load_dataset
    from device_runtime.prompts import encode_prompt
    from device_runtime.protocol import PromptInfo
    from device_runtime.train import TrainConfig, train

    ds = load_dataset(shard_path, bundle.manifest, bundle.path("tokenizer.json"))
    n_val = max(1, len(ds) // 10)
    val = _subset(ds, np.arange(n_val))
    tr = _subset(ds, np.arange(n_val, len(ds)))
    res = train(bundle, tr, TrainConfig(epochs=opts.pool_epochs, lr=opts.pool_lr, progress=False,
                                        threads=opts.threads), val)
    labels = bundle.manifest.labels
    counts = {labels[i]: int((tr.labels == i).sum()) for i in range(len(labels))}
    info = PromptInfo(task=bundle.manifest.task, labels=list(labels), val_accuracy=res.report["eval_accuracy"],
                      label_counts=counts, description=f"SST-2 shard {name}: {counts}")
    blob = encode_prompt(res.tensors, info, bundle_hash=bundle.hash, device_id=name, samples=len(tr))
    return blob, res.report


def _subset(ds, idx: np.ndarray):
    from dataclasses import replace

    return replace(ds, input_ids=ds.input_ids[idx], attention_mask=ds.attention_mask[idx],
                   labels=None if ds.labels is None else ds.labels[idx], lengths=ds.lengths[idx],
                   texts=[ds.texts[i] for i in idx])


def newcomer_compare(bundle, pool: dict, rows_path: Path, val_ds, val_logp: np.ndarray, opts: PromptDemoOptions,
                     seed: int) -> dict:
    """(a) own prompt, (b) transfer-initialised prompt, (c) ensembles, on one seed's N rows."""
    from device_runtime.data import load_dataset
    from device_runtime.prompt_ensemble import (
        accuracy_of,
        ensemble_log_probs,
        fit_mix,
        member_log_probs,
        mix_from_scores,
        train_embedding_mix,
        transfer_scores,
    )
    from device_runtime.step_backend import StepBackend
    from device_runtime.train import TrainConfig, train
    from device_runtime.weights import initial_tensors

    ds = load_dataset(rows_path, bundle.manifest, bundle.path("tokenizer.json"))
    names = sorted(pool)
    members = [pool[n].tensors for n in names]
    cfg = TrainConfig(epochs=opts.newcomer_epochs, lr=opts.newcomer_lr, seed=seed, progress=False,
                      threads=opts.threads)
    own = train(bundle, ds, cfg)
    own_acc = accuracy_of(bundle, own.tensors, val_ds, opts.threads)["accuracy"]

    t0 = time.perf_counter()
    backend = StepBackend(bundle, threads=opts.threads)
    setup_s = time.perf_counter() - t0
    logp = member_log_probs(bundle, members, ds, backend=backend)  # K forwards over the N rows
    scores = transfer_scores(logp, ds.labels)
    score_s = time.perf_counter() - t0
    best = int(np.argmin([s["loss"] for s in scores]))
    tr = train(bundle, ds, cfg, initial_state=members[best])
    transfer_acc = accuracy_of(bundle, tr.tensors, val_ds, opts.threads)["accuracy"]

    init = mix_from_scores(scores)
    t1 = time.perf_counter()
    mix, _ = fit_mix(logp, ds.labels, init=init, epochs=opts.newcomer_epochs, lr=opts.mix_lr, seed=seed)
    fit_s = time.perf_counter() - t1
    ens_pred = ensemble_log_probs(val_logp, mix).argmax(-1)
    ensemble_acc = float((ens_pred == val_ds.labels).mean())

    init_head = {n: v for n, v in members[best].items()}
    emb = train_embedding_mix(bundle, members, ds, init_mix=init, init_head=init_head,
                              epochs=opts.newcomer_epochs, lr=opts.newcomer_lr, seed=seed, threads=opts.threads)
    emb_acc = accuracy_of(bundle, emb.tensors, val_ds, opts.threads)["accuracy"]
    uniform = float((ensemble_log_probs(val_logp, np.zeros(len(members))).argmax(-1) == val_ds.labels).mean())
    init_acc = accuracy_of(bundle, initial_tensors(bundle), val_ds, opts.threads)["accuracy"]
    return {
        "seed": seed,
        "rows": len(ds),
        "own_accuracy": own_acc,
        "own_seconds": own.report["wall_s"],
        "transfer_accuracy": transfer_acc,
        "transfer_source": names[best],
        "transfer_scores": {n: {k: round(v, 4) for k, v in s.items()} for n, s in zip(names, scores, strict=True)},
        "transfer_seconds": round(score_s + tr.report["wall_s"], 3),
        "ensemble_accuracy": ensemble_acc,
        "ensemble_seconds": round(score_s + fit_s, 3),
        "ensemble_breakdown_s": {"session": round(setup_s, 3), "forwards": round(score_s - setup_s, 3),
                                 "fit": round(fit_s, 3)},
        "own_steps": own.report["steps"],
        "ensemble_weights": [round(float(x), 4) for x in np.exp(init - init.max()) / np.exp(init - init.max()).sum()],
        "ensemble_mix": dict(zip(names, [round(float(x), 4) for x in _softmax(mix)], strict=True)),
        "uniform_ensemble_accuracy": uniform,
        "embedding_mix_accuracy": emb_acc,
        "embedding_mix_seconds": round(emb.seconds, 3),
        "untrained_accuracy": init_acc,
    }


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max())
    return z / z.sum()


def run_prompt_demo(opts: PromptDemoOptions, say: Say) -> dict:
    from device_runtime.bundle.load import load_bundle
    from device_runtime.data import load_dataset
    from device_runtime.prompt_ensemble import member_log_probs
    from device_runtime.prompts import collect_prompts, publish_prompt, send_prompt_to
    from device_runtime.protocol import Topics
    from edge_broker.broker import make_accounts, start_broker
    from edge_broker.coordinator.config import CoordinatorConfig
    from edge_broker.coordinator.coordinator import Coordinator

    t_start = time.perf_counter()
    if opts.fresh and opts.workdir.exists():
        shutil.rmtree(opts.workdir)
    opts.workdir.mkdir(parents=True, exist_ok=True)
    for stale in ("broker", "edge", "data"):
        shutil.rmtree(opts.workdir / stale, ignore_errors=True)
    bundle_dir = export_prompt_bundle(opts, say)
    bundle = load_bundle(bundle_dir)
    fields, shards, spare = _split_rows(opts)
    pool_names = [f"pool{i + 1}" for i in range(opts.pool_devices)]
    shard_paths = [write_tsv(opts.workdir / "data" / f"{n}.tsv", fields, s)
                   for n, s in zip(pool_names, shards, strict=True)]
    accounts = make_accounts([*pool_names, "newcomer"])
    pw = {a.username: a.password for a in accounts}
    topics = Topics(FLEET)
    broker = start_broker(opts.workdir / "broker", accounts, kind=opts.broker, port=0, fleets=[FLEET])  # type: ignore[arg-type]
    coord = None
    clients = []
    report: dict = {"pool": {}}
    try:
        mps = broker.client_options().get("max_packet_size")
        cfg = CoordinatorConfig(broker=broker.url, password=pw["edge"], fleet=FLEET, bundle=bundle_dir,
                                workdir=opts.workdir / "edge", devices=[*pool_names, "newcomer"],
                                max_packet_size=mps)
        coord = Coordinator(cfg)
        coord.connect()
        say(f"{broker.kind} broker at {broker.url}; the edge keeps the prompt pool")
        newcomer = _connect(broker.url, "newcomer", pw["newcomer"], mps)
        clients.append(newcomer)
        direct = newcomer.subscribe(topics.prompts_for("newcomer"))
        for name, path in zip(pool_names, shard_paths, strict=True):
            blob, rep = train_pool_device(bundle, name, path, opts)
            dev = _connect(broker.url, name, pw[name], mps)
            clients.append(dev)
            acks = dev.subscribe(topics.ack_to(name))
            _hello(dev, topics, name)
            env = publish_prompt(dev, topics, name, blob)
            deadline = time.monotonic() + 60
            while not any(r.device == name for r in coord.store.prompts()) and time.monotonic() < deadline:
                coord.pump(0.2)
            ack = _ack(acks, env.header.key, 30)
            if not ack["accepted"]:
                raise RuntimeError(f"the edge refused {name}'s prompt: {ack['reason']}")
            if name == pool_names[0]:
                send_prompt_to(dev, topics, name, "newcomer", blob)
            report["pool"][name] = {"val_accuracy": rep["eval_accuracy"], "train_rows": rep["train_rows"],
                                    "seconds": rep["wall_s"], "bytes": len(blob)}
            say(f"{name}: prompt + head trained on {rep['train_rows']} rows in {rep['wall_s']:.0f}s, held-out "
                f"accuracy {rep['eval_accuracy']:.3f}; prompt accepted into the pool ({len(blob) / 1e3:.1f} kB)")

        got_direct, refused = collect_prompts(direct, bundle_hash=bundle.hash, want=1, timeout=30)
        t0 = time.perf_counter()
        pool_q = newcomer.subscribe(topics.prompt_pool())  # retained: the whole pool arrives now
        pool, refused_pool = collect_prompts(pool_q, bundle_hash=bundle.hash, want=len(pool_names), timeout=60)
        refused.update(refused_pool)
        if len(pool) != len(pool_names):
            raise RuntimeError(f"the newcomer received {len(pool)} of {len(pool_names)} pool prompts ({refused})")
        pool_bytes = sum(p.bytes for p in pool.values())
        say(f"newcomer: {len(pool)} pool prompts received ({pool_bytes / 1e3:.1f} kB in "
            f"{time.perf_counter() - t0:.2f}s), {len(got_direct)} sent directly by {', '.join(got_direct)}")

        val_ds = load_dataset(opts.eval_data, bundle.manifest, bundle.path("tokenizer.json"))
        val_logp = member_log_probs(bundle, [pool[n].tensors for n in sorted(pool)], val_ds, threads=opts.threads)
        for n, lp in zip(sorted(pool), val_logp, strict=True):
            report["pool"][n]["validation_accuracy"] = float((lp.argmax(-1) == val_ds.labels).mean())
        seeds = []
        for seed in range(opts.seeds):
            rows = random.Random(seed).sample(spare, opts.newcomer_rows)
            path = write_tsv(opts.workdir / "data" / f"newcomer-seed{seed}.tsv", fields, rows)
            r = newcomer_compare(bundle, pool, path, val_ds, val_logp, opts, seed)
            r["pool_bytes"] = pool_bytes
            seeds.append(r)
            say(f"seed {seed}: own {r['own_accuracy']:.3f} ({r['own_seconds']:.1f}s), transfer "
                f"{r['transfer_accuracy']:.3f} (from {r['transfer_source']}), ensemble {r['ensemble_accuracy']:.3f} "
                f"({r['ensemble_seconds']:.2f}s), embedding mix {r['embedding_mix_accuracy']:.3f} "
                f"({r['embedding_mix_seconds']:.1f}s)")
    finally:
        for c in clients:
            c.close()
        if coord is not None:
            coord.close()
        broker.stop()
    keys = ("own_accuracy", "transfer_accuracy", "ensemble_accuracy", "own_seconds", "transfer_seconds",
            "ensemble_seconds", "embedding_mix_accuracy", "embedding_mix_seconds", "uniform_ensemble_accuracy",
            "pool_bytes")
    report.update({k: statistics.fmean(s[k] for s in seeds) for k in keys})
    report.update(seeds=seeds, broker=broker.kind, bundle_dir=str(bundle_dir), newcomer_rows=opts.newcomer_rows,
                  pool_devices=opts.pool_devices, rows_per_device=opts.rows_per_device,
                  prompt_tokens=opts.prompt_tokens, direct_prompts=sorted(got_direct),
                  untrained_accuracy=seeds[0]["untrained_accuracy"] if seeds else None,
                  wall_s=round(time.perf_counter() - t_start, 1))
    return report
