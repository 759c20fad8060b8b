"""Protocol parity of the browser device: its wire-format modules (device_web/src, run by Node) against
the Python definitions, on fixtures Python writes here. Envelopes and chunks Python encoded decode in JS
(tampered ones are refused); topics and the bundle hash come out the same; every payload JS encodes
(4 encodings, full and delta) decodes with the Python ``decode_update`` within the format's error; JS
envelopes and chunked updates decode and reassemble in Python."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from device_runtime.bundle.manifest import Manifest
from device_runtime.payload import ENCODINGS, decode_update, max_decode_error
from device_runtime.protocol import Envelope, Hello, Reassembler, Topics, parse_body, split
from tests._browser import WEB

FLEET, DEVICE = "lab", "phone-1"


@pytest.fixture
def golden(web_dist, tmp_path):
    """Write the Python fixtures, run the JS side on them, return (dir, its output)."""
    if shutil.which("node") is None:
        pytest.skip("node not installed")
    rng = np.random.default_rng(0)
    tensors = {"a.lora_A": rng.normal(size=(4, 6)).astype(np.float32),
               "a.lora_B": (rng.normal(size=(6, 4)) * 1e-3).astype(np.float32),
               "head.bias": rng.normal(size=(2,)).astype(np.float32)}
    base = {k: (v + rng.normal(size=v.shape).astype(np.float32) * 0.1).astype(np.float32) for k, v in tensors.items()}
    files = {"step.onnx": "ab" * 32, "weights.safetensors": "cd" * 32, "tokenizer.json": "ef" * 32}
    envs = {
        "py-hello.deft": Envelope.json_message("hello", {"kit_version": "x"}, sender=DEVICE, fleet=FLEET),
        "py-task.deft": Envelope.json_message("task", {"round": 2, "bundle_hash": "b" * 64}, sender="edge",
                                               fleet=FLEET, round=2),
        "py-global.deft": Envelope.build("global", sender="edge", fleet=FLEET, round=1, body=bytes(range(256)) * 3,
                                         content="safetensors", meta={"bundle": "b" * 64, "round": 1}),
    }
    for name, env in envs.items():
        (tmp_path / name).write_bytes(env.encode())
    big = Envelope.build("bundle", sender="edge", fleet=FLEET, body=bytes(rng.integers(0, 256, 20_000, dtype=np.uint8)),
                         key="t" * 64)
    chunks = [c.encode() for c in split(big, 4096, transfer="t" * 64)]
    for i, c in enumerate(chunks):
        (tmp_path / f"py-chunk-{i}.deft").write_bytes(c)
    bad = bytearray(chunks[0])
    bad[-1] ^= 1
    (tmp_path / "py-tampered.deft").write_bytes(bytes(bad))
    spec = {"fleet": FLEET, "device": DEVICE, "bundle_hash": "b" * 64, "files": files,
            "envelopes": list(envs), "chunks": [f"py-chunk-{i}.deft" for i in range(len(chunks))],
            "tampered": ["py-tampered.deft"],
            "tensors": {k: {"shape": list(v.shape), "values": v.reshape(-1).tolist()} for k, v in tensors.items()},
            "base": {k: v.reshape(-1).tolist() for k, v in base.items()}}
    (tmp_path / "in.json").write_text(json.dumps(spec))
    subprocess.run(["node", str(WEB / "test" / "golden.mjs"), str(tmp_path)], check=True, timeout=60,
                   capture_output=True)
    return tmp_path, json.loads((tmp_path / "out.json").read_text()), envs, big, tensors, base, files


def test_js_decodes_python_envelopes_and_refuses_tampered_ones(golden):
    _, out, envs, big, *_ = golden
    for name, env in envs.items():
        got = out["envelopes"][name]
        assert got["header"]["type"] == env.header.type and got["header"]["key"] == env.header.key
        assert got["header"]["sha256"] == got["body_sha256"] == env.header.sha256
        assert got["header"]["meta"] == env.header.meta and got["header"].get("round") == env.header.round
    assert out["reassembled"]["length"] == len(big.body) and out["reassembled"]["header"]["sha256"] == big.header.sha256
    assert "sha256" in out["refused"]["py-tampered.deft"]


def test_js_topics_and_bundle_hash_match_python(golden):
    _, out, _, _, _, _, files = golden
    t = Topics(FLEET)
    assert out["topics"] == {"hello": t.hello(DEVICE), "update": t.update(DEVICE, 7),
                             "bundle_request": t.bundle_request(DEVICE), "ack_to": t.ack_to(DEVICE),
                             "global": t.global_state(), "status": t.status(DEVICE), "heartbeat": t.heartbeat(DEVICE)}
    m = Manifest.model_construct(files=files)
    assert out["bundle_hash"] == m.bundle_hash()


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("kind", ["full", "delta"])
def test_js_payloads_decode_with_python(golden, encoding, kind):
    d, _, _, _, tensors, base, _ = golden
    upd = decode_update((d / f"payload-{encoding}-{kind}.bin").read_bytes(), bundle_hash="b" * 64)
    assert upd.meta.kind == kind and upd.meta.encoding == encoding and upd.meta.device_id == DEVICE
    assert upd.meta.round == 3 and upd.meta.samples == 40 and upd.meta.metrics["steps"] == 3
    for k, x in tensors.items():
        want = x - base[k] if kind == "delta" else x
        err = float(np.abs(upd.tensors[k] - want).max())
        assert err <= max_decode_error(want, encoding) + 1e-7, (k, err)


def test_python_decodes_js_envelopes_and_chunks(golden):
    d, out, *_ = golden
    hello = parse_body(Envelope.decode((d / "js-hello.deft").read_bytes()), Hello)
    assert hello.profile == {"board": "browser"}
    r = Reassembler()
    whole = None
    for i in range(out["js_chunks"]):
        whole = r.add(Envelope.decode((d / f"js-chunk-{i}.deft").read_bytes())) or whole
    assert out["js_chunks"] > 1 and whole is not None and whole.header.key == "k-js"
    assert decode_update(whole.body).meta.encoding == "fp32"
