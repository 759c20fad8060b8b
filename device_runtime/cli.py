"""``deft device``: train, evaluate and predict on the device (no torch, no transformers).

Every command takes ``--json`` and then prints, as its last stdout line, one JSON object (scripts
parse that line). Problems with the user's inputs print ``error: <one line>`` and exit with 2.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from device_runtime.backends import BACKENDS
from device_runtime.choices import choices
from device_runtime.errors import DeftError, DeviceError, first_error
from device_runtime.payload import ENCODINGS
from device_runtime.protocol.topics import DEFAULT_FLEET

# the choices typer offers and checks (one list each, from where they are defined)
Schedule = choices("Schedule", ("linear", "constant", "cosine"))
LongRows = choices("LongRows", ("truncate", "skip"))
EncodingChoice = choices("EncodingChoice", ENCODINGS)
BackendChoice = choices("BackendChoice", BACKENDS)

# options several commands share, declared once
BundleDir = Annotated[Path, typer.Option("--bundle", help="Bundle directory written by `deft export`.")]
StateFile = Annotated[Optional[Path], typer.Option(  # noqa: UP045 - typer reads Optional here
    "--state", help="Trained tensors: update payload or safetensors.")]
MaxLength = Annotated[Optional[int], typer.Option("--max-length", help="Default: the bundle's max length.")]  # noqa: UP045
TextColumn = Annotated[Optional[str], typer.Option("--text-column", help="Default: sentence / text.")]  # noqa: UP045
Backend = Annotated[BackendChoice, typer.Option("--backend", help="Training backend.")]
Threads = Annotated[Optional[int], typer.Option(  # noqa: UP045
    "--threads", help="CPU threads to use (default: all cores).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print a JSON report as the last stdout line.")]

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Train, evaluate and predict on a device (ONNX Runtime; no torch needed).")


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _emit(report: dict, as_json: bool, human) -> None:
    if as_json:
        sys.stdout.write(json.dumps(report, default=_json_default) + "\n")
        sys.stdout.flush()
    else:
        human(report)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def _table(title: str, rows: list[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value")
    for k, v in rows:
        t.add_row(k, v)
    Console().print(t)


def _fmt(v, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def _load_tensors(path: Path, base: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    from device_runtime.state import load_state_file

    return load_state_file(path, base)


def _bundle_and_backend(bundle: Path, backend: BackendChoice, threads: int | None, state: Path | None):
    """The loaded bundle and a backend for it, with ``state`` applied when given."""
    from device_runtime.backends import make_backend
    from device_runtime.bundle.load import load_bundle
    from device_runtime.state import apply_global_state

    b = load_bundle(bundle)
    be = make_backend(b, backend.value, threads=threads)
    if state is not None:
        apply_global_state(be, _load_tensors(state, be.get_tensors))
    return b, be


@app.command()
def train(
    bundle: BundleDir,
    data: Path = typer.Option(..., "--data", help="Training data: .tsv/.csv/.jsonl (or .txt for causal LM)."),
    eval_data: Path | None = typer.Option(None, "--eval-data", help="Held-out data for evaluation."),
    epochs: float = typer.Option(1.0, "--epochs", help="Passes over the data (ignored with --steps)."),
    steps: int | None = typer.Option(None, "--steps", help="Total optimizer steps (overrides --epochs)."),
    batch_size: int = typer.Option(16, "--batch-size"),
    lr: float = typer.Option(1e-3, "--lr", help="Peak learning rate."),
    schedule: Schedule = typer.Option(Schedule.linear, "--schedule", help="Learning-rate schedule."),
    warmup_steps: int = typer.Option(0, "--warmup-steps"),
    seed: int = typer.Option(0, "--seed", help="Data order and dropout seed."),
    eval_every: int = typer.Option(0, "--eval-every", help="Evaluate every N steps (0: only at the end)."),
    max_length: MaxLength = None,
    text_column: TextColumn = None,
    label_column: str | None = typer.Option(None, "--label-column", help="Default: label."),
    limit: int | None = typer.Option(None, "--limit", help="Use only the first N usable training rows."),
    long_rows: LongRows = typer.Option(LongRows.truncate, "--long-rows", help="Truncate or skip rows over max length."),
    global_state: Path | None = typer.Option(None, "--global-state",
                                                help="Start from these tensors (payload or safetensors)."),
    out: Path | None = typer.Option(None, "--out", help="Write the update payload here."),
    encoding: EncodingChoice = typer.Option("fp32", "--encoding", help="How the payload stores values."),
    delta: bool = typer.Option(False, "--delta/--full", help="Send the change from the start tensors."),
    topk: float | None = typer.Option(None, "--topk", help="Keep this fraction of entries per tensor."),
    device_id: str = typer.Option("device", "--device-id"),
    round_: int = typer.Option(0, "--round", help="Federated round this update belongs to."),
    checkpoint_dir: Path | None = typer.Option(
        None, "--checkpoint-dir", help="Resumable checkpoints (default: OUT.ckpt next to --out)."),
    checkpoint_every: int = typer.Option(50, "--checkpoint-every"),
    keep_checkpoints: bool = typer.Option(False, "--keep-checkpoints",
                                          help="Keep the checkpoint directory after a finished run."),
    backend: Backend = BackendChoice.ort,
    threads: Threads = None,
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    as_json: AsJson = False,
) -> None:
    """Fine-tune the bundle on local data and write an update payload."""
    try:
        report = _train(**locals())
    except DeftError as exc:
        _fail(str(exc))
    _emit(report, as_json, _human_train)


def _train(*, bundle, data, eval_data, epochs, steps, batch_size, lr, schedule, warmup_steps, seed, eval_every,
           max_length, text_column, label_column, limit, long_rows, global_state, out, encoding, delta, topk,
           device_id, round_, checkpoint_dir, checkpoint_every, keep_checkpoints, backend, threads, progress,
           as_json) -> dict:
    from device_runtime.bundle.load import load_bundle
    from device_runtime.data import load_dataset
    from device_runtime.payload import encode_update
    from device_runtime.train import TrainConfig
    from device_runtime.train import train as run_training

    # typer checked the choices; plain strings from here on
    schedule, long_rows, encoding, backend = schedule.value, long_rows.value, encoding.value, backend.value
    if topk is not None and not 0 < topk <= 1:
        raise DeviceError(f"--topk {topk} must be a fraction in (0, 1]")
    b = load_bundle(bundle)
    kw = {"text_column": text_column, "label_column": label_column, "max_length": max_length,
          "long_rows": long_rows}
    train_ds = load_dataset(data, b.manifest, b.tokenizer, limit=limit, **kw)
    eval_ds = load_dataset(eval_data, b.manifest, b.tokenizer, **kw) if eval_data is not None else None
    initial = None
    if global_state is not None:
        from device_runtime.backends import make_backend

        initial = _load_tensors(global_state, lambda: make_backend(b, backend, threads=threads).get_tensors())
    ck = checkpoint_dir if checkpoint_dir is not None else (out.with_name(out.name + ".ckpt") if out else None)
    cfg = TrainConfig(epochs=epochs, steps=steps, batch_size=batch_size, lr=lr, schedule=schedule,
                      warmup_steps=warmup_steps, seed=seed, eval_every=eval_every,
                      checkpoint_dir=str(ck) if ck else None, checkpoint_every=checkpoint_every,
                      progress=progress, backend=backend, threads=threads)
    result = run_training(b, train_ds, cfg, eval_ds, initial_state=initial)
    report = dict(result.report)
    report["payload_bytes"] = None
    if out is not None:
        from device_runtime.atomic import atomic_write_bytes

        metrics = {k: report[k] for k in ("eval_accuracy", "eval_loss", "train_rows", "steps")
                   if report.get(k) is not None}
        if report["train_loss"]:
            metrics["final_train_loss"] = report["train_loss"][-1]
        blob = encode_update(result.tensors, bundle_hash=b.hash, device_id=device_id, round=round_,
                             samples=report["samples"], metrics=metrics, encoding=encoding,
                             base=result.start_tensors if delta else None, topk=topk)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, blob)
        report.update(payload=str(out), payload_bytes=len(blob), encoding=encoding,
                      payload_kind="delta" if delta else "full", topk=topk)
        if ck is not None and checkpoint_dir is None and not keep_checkpoints:
            shutil.rmtree(ck, ignore_errors=True)
    report["checkpoint_dir"] = str(ck) if ck is not None and Path(ck).exists() else None
    return report


def _human_train(r: dict) -> None:
    losses = r["train_loss"]
    _table("deft device train", [
        ("backend", r["backend"]),
        ("steps", f"{r['steps']} ({r['steps_run']} run here"
                  + (f", resumed from {r['resumed_from_step']}" if r.get("resumed_from_step") else "") + ")"),
        ("samples", str(r["samples"])),
        ("skipped rows", f"{r['skipped_rows']} {r['skipped'] or ''}"),
        ("train loss", f"{losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "-"),
        ("eval accuracy", _fmt(r["eval_accuracy"])),
        ("median step", f"{_fmt(r['median_step_s'], '.4f')} s"),
        ("peak RSS", f"{r['peak_rss_mb']} MB"),
        ("payload", f"{r.get('payload')} ({r['payload_bytes']} bytes, {r.get('encoding')})"
         if r.get("payload_bytes") else "-"),
    ])


@app.command("eval")
def eval_command(
    bundle: BundleDir,
    data: Path = typer.Option(..., "--data", help="Labelled data to evaluate on."),
    state: StateFile = None,
    max_length: MaxLength = None,
    text_column: TextColumn = None,
    label_column: str | None = typer.Option(None, "--label-column"),
    batch_size: int = typer.Option(64, "--batch-size"),
    backend: Backend = BackendChoice.ort,
    threads: Threads = None,
    as_json: AsJson = False,
) -> None:
    """Evaluate the bundle (optionally with trained tensors) on labelled data: loss and accuracy."""
    from device_runtime.data import load_dataset
    from device_runtime.evaluate import evaluate
    from device_runtime.resources import peak_rss_mb

    try:
        b, be = _bundle_and_backend(bundle, backend, threads, state)
        ds = load_dataset(data, b.manifest, b.tokenizer, text_column=text_column, label_column=label_column,
                          max_length=max_length)
        res = evaluate(be, ds, batch_size)
    except DeftError as exc:
        _fail(str(exc))
    report = {"accuracy": res["accuracy"], "loss": res["loss"], "rows": res["rows"],
              "skipped_rows": ds.skipped_rows, "skipped": dict(ds.skipped), "bundle_hash": b.hash,
              "state": str(state) if state else None, "peak_rss_mb": round(peak_rss_mb(), 1)}
    _emit(report, as_json, lambda r: _table("deft device eval", [
        ("accuracy", _fmt(r["accuracy"])), ("loss", _fmt(r["loss"])), ("rows", str(r["rows"])),
        ("skipped rows", str(r["skipped_rows"]))]))


@app.command()
def predict(
    bundle: BundleDir,
    data: Path | None = typer.Option(None, "--data", help="File of texts (labels, if any, are ignored)."),
    text: Optional[list[str]] = typer.Option(  # noqa: UP045 - typer needs Optional for lists
        None, "--text", help="A text to classify (repeatable)."),
    state: StateFile = None,
    member: Optional[list[Path]] = typer.Option(  # noqa: UP045
        None, "--member", help="Prompt-ensemble member (payload/safetensors with e.g. a soft prompt; repeatable)."),
    weight: Optional[list[float]] = typer.Option(  # noqa: UP045
        None, "--weight", help="Weight per --member (repeatable)."),
    text_column: TextColumn = None,
    max_length: MaxLength = None,
    batch_size: int = typer.Option(64, "--batch-size"),
    backend: Backend = BackendChoice.ort,
    threads: Threads = None,
    as_json: AsJson = False,
) -> None:
    """Classify texts with the trained state, or with a weighted prompt ensemble (--member ...)."""
    from device_runtime.data import load_dataset, tokenize_texts
    from device_runtime.predict import label_names, predict_ensemble, predict_proba

    # the options alone decide these: checked before anything is loaded
    if (data is None) == (not text):
        _fail("give either --data FILE or one or more --text")
    if member and weight and len(weight) != len(member):
        _fail(f"{len(weight)} --weight values for {len(member)} --member files")
    try:
        b, be = _bundle_and_backend(bundle, backend, threads, state)
        if data is not None:
            ds = load_dataset(data, b.manifest, b.tokenizer, text_column=text_column, labelled=False,
                              max_length=max_length)
        else:
            ds = tokenize_texts(list(text), b.manifest, b.tokenizer, max_length)
        if member:
            members = [_load_tensors(m, be.get_tensors) for m in member]
            probs = predict_ensemble(be, ds, members, weight or None, batch_size)
        else:
            probs = predict_proba(be, ds, batch_size)
    except DeftError as exc:
        _fail(str(exc))
    pred = probs.argmax(-1)
    names = label_names(b.manifest, pred)
    rows = [{"text": t, "label": n, "probs": [round(float(x), 6) for x in p]}
            for t, n, p in zip(ds.texts, names, probs, strict=True)]
    report = {"predictions": rows, "labels": b.manifest.labels, "ensemble": len(member or []),
              "skipped_rows": ds.skipped_rows}

    def human(r: dict) -> None:
        from rich.console import Console
        from rich.table import Table

        t = Table(title="deft device predict")
        for c in ("label", "p", "text"):
            t.add_column(c)
        for row in r["predictions"]:
            t.add_row(row["label"], f"{max(row['probs']):.3f}", row["text"][:80])
        Console().print(t)

    _emit(report, as_json, human)


@app.command("run")
def run_command(
    broker: str = typer.Option(..., "--broker",
                               help="Broker URL, e.g. mqtt://127.0.0.1:1883 (credentials may be in it)."),
    device_id: str = typer.Option(..., "--id", help="This device's id (also its MQTT user name)."),
    data: Path = typer.Option(..., "--data", help="Local training data (TSV/CSV/JSONL); it never leaves the device."),
    password: str | None = typer.Option(None, "--password", envvar="DEFT_PASSWORD",
                                        help="MQTT password (or in the URL)."),
    fleet: str = typer.Option(DEFAULT_FLEET, "--fleet", help="Fleet name (topic tree deft/v1/<fleet>/...)."),
    workdir: Path | None = typer.Option(None, "--workdir",
                                        help="Bundles, checkpoints, spool (default ./deft-device-<id>)."),
    bundle: Path | None = typer.Option(None, "--bundle", help="A bundle already on this device (skips the download)."),
    board: str | None = typer.Option(None, "--board", help="Hardware profile name sent in the hello (e.g. rpi5-8gb)."),
    text_column: str | None = typer.Option(None, "--text-column"),
    label_column: str | None = typer.Option(None, "--label-column"),
    backend: BackendChoice = typer.Option("ort", "--backend", help="Training backend."),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads for training."),
    max_rounds: int | None = typer.Option(None, "--max-rounds", help="Exit after this many rounds."),
    max_packet_size: int | None = typer.Option(None, "--max-packet-size",
                                               help="The broker's packet limit if it cannot announce it (MQTT 3.1.1)."),
    idle_exit: float | None = typer.Option(None, "--idle-exit", help="Exit after this many seconds without a task."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary line when it exits."),
    verbose: bool = typer.Option(False, "-v", "--verbose"),
) -> None:
    """Join a fleet: train on each round's task and upload the update, until stopped (Ctrl-C / SIGTERM)."""
    import logging
    import signal

    from pydantic import ValidationError

    from device_runtime.agent import AgentConfig, DeviceAgent
    from device_runtime.protocol import check_id

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s {device_id} %(levelname)s %(message)s")
    try:
        check_id(device_id)
        if not data.is_file():
            raise DeviceError(f"data file {data} does not exist")
        profile = {"board": board} if board else {}
        cfg = AgentConfig(broker=broker, device_id=device_id, password=password,
                          fleet=fleet, data=data, workdir=workdir or Path(f"deft-device-{device_id}"),
                          text_column=text_column, label_column=label_column, profile=profile, backend=backend.value,
                          threads=threads, max_rounds=max_rounds, idle_exit_s=idle_exit,
                          max_packet_size=max_packet_size)
        agent = DeviceAgent(cfg)
        if bundle is not None:
            agent.cache.add_dir(bundle)
    except ValidationError as exc:
        _fail("{}: {}".format(*first_error(exc)))
    except DeftError as exc:
        _fail(str(exc))

    def _stop(*_):
        agent.stop_event.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        summary = agent.run()
    except DeftError as exc:
        _fail(str(exc))
    _emit(summary, as_json, lambda r: typer.echo(
        f"{r['device']}: {len(r['rounds'])} round(s), up {r['bytes_up']:,} B, down {r['bytes_down']:,} B"))
