"""Prompts over MQTT on a REAL Mosquitto with the real coordinator: a device publishes its prompt to
the edge's pool, another receives it from the pool (retained) and directly (prompt-to); tampered,
oversize, wrong-bundle and wrong-task prompts are refused with their reason and never enter the pool.
Plus the prompt-ensemble step graph and the mixing maths on a tiny BERT."""

from __future__ import annotations

import numpy as np
import pytest

from device_runtime.bundle.load import load_bundle
from device_runtime.data import load_dataset
from device_runtime.prompts import collect_prompts, decode_prompt, encode_prompt, publish_prompt, send_prompt_to
from device_runtime.protocol import Hello, PromptInfo, to_envelope
from edge_broker.coordinator.config import CoordinatorConfig
from edge_broker.coordinator.coordinator import Coordinator
from tests._broker import FLEET, wait_until
from tests._models import SST2_TRAIN

K = 3


@pytest.fixture(scope="session")
def tiny_prompt_bundle(tiny_model_dir, bundle_factory):
    """Tiny BERT, 4-token soft prompt + head, with the prompt-ensemble step graph over 3 pool prompts."""
    return load_bundle(bundle_factory(tiny_model_dir("bert"), task="seq-cls", num_labels=2, max_length=32,
                                      peft="prompt", num_virtual_tokens=4, prompt_pool=K))


def _members(bundle, n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    from device_runtime.weights import initial_tensors

    rng = np.random.default_rng(seed)
    base = initial_tensors(bundle)
    return [{k: (v + rng.normal(0, 0.2, v.shape)).astype(np.float32) for k, v in base.items()} for _ in range(n)]


def _info(bundle, **kw) -> PromptInfo:
    m = bundle.manifest
    return PromptInfo(task=kw.pop("task", m.task), labels=kw.pop("labels", list(m.labels)),
                      val_accuracy=kw.pop("val_accuracy", 0.7), label_counts={"0": 10, "1": 22},
                      description="test shard", **kw)


def _rows(tmp_path, n: int):
    lines = SST2_TRAIN.read_text().splitlines()
    p = tmp_path / "rows.tsv"
    p.write_text("\n".join(lines[: n + 1]) + "\n")
    return p


@pytest.mark.mosquitto
def test_prompt_pool_transfer_and_refusals(fresh_mosquitto, mqtt_client, tiny_prompt_bundle, tmp_path):
    bundle = tiny_prompt_bundle
    but = fresh_mosquitto()
    t = but.topics
    cfg = CoordinatorConfig(broker=f"mqtt://127.0.0.1:{but.broker.port}", password=but.passwords["edge"], fleet=FLEET,
                            bundle=bundle.root, workdir=tmp_path / "edge", devices=["dev1", "dev2", "dev3"],
                            max_prompt_bytes=64 * 1024, eval_initial=False)
    coord = Coordinator(cfg)
    coord.connect()
    try:
        devs = {d: mqtt_client(but, d) for d in ("dev1", "dev2", "dev3")}
        acks = {d: c.subscribe(t.ack_to(d)) for d, c in devs.items()}
        for d, c in devs.items():
            c.publish(t.hello(d), to_envelope(Hello(kit_version="test"), sender=d, fleet=FLEET), retain=True)
        wait_until(lambda: (coord.pump(0.1), len(coord.registry.registered()) == 3)[1], 20, "three hellos")

        def ack_of(dev, env):
            got = {}

            def seen():
                coord.pump(0.1)
                while not acks[dev].empty():
                    body = acks[dev].get().envelope.json()
                    got[body["ack"]] = body
                return env.header.key in got

            wait_until(seen, 20, f"the edge's ack of {dev}'s prompt")
            return got[env.header.key]

        members = _members(bundle, 2)
        blobs = {d: encode_prompt(m, _info(bundle), bundle_hash=bundle.hash, device_id=d, samples=32)
                 for d, m in zip(("dev1", "dev2"), members, strict=True)}
        for d, blob in blobs.items():
            assert ack_of(d, publish_prompt(devs[d], t, d, blob))["accepted"] is True
        assert [r.device for r in coord.store.prompts()] == ["dev1", "dev2"]

        # refused, each with its reason, and the pool unchanged
        good = blobs["dev1"]
        tampered = bytearray(good)
        tampered[-3] ^= 0xFF  # a tensor byte: the payload's content sha256 no longer matches
        huge = {**members[0], "extra": np.zeros(40_000, np.float32)}
        bad = {
            "malformed": bytes(tampered),
            "too_large": encode_prompt(huge, _info(bundle), bundle_hash=bundle.hash, device_id="dev3", samples=8),
            "wrong_bundle": encode_prompt(members[0], _info(bundle), bundle_hash="f" * 64, device_id="dev3",
                                          samples=8),
            "wrong_task": encode_prompt(members[0], _info(bundle, labels=["a", "b"]), bundle_hash=bundle.hash,
                                        device_id="dev3", samples=8),
            "device_mismatch": good,  # dev1's prompt re-sent by dev3
            "wrong_shape": encode_prompt({k: v[..., :1] if v.ndim else v for k, v in members[0].items()},
                                         _info(bundle), bundle_hash=bundle.hash, device_id="dev3", samples=8),
        }
        for reason, blob in bad.items():
            ack = ack_of("dev3", publish_prompt(devs["dev3"], t, "dev3", blob))
            assert ack["accepted"] is False and ack["reason"].startswith(reason + ":"), (reason, ack)
        assert [r.device for r in coord.store.prompts()] == ["dev1", "dev2"]

        # the newcomer gets the pool (retained) and dev1's prompt directly
        direct = devs["dev3"].subscribe(t.prompts_for("dev3"))
        send_prompt_to(devs["dev1"], t, "dev1", "dev3", good)
        got, refused = collect_prompts(direct, bundle_hash=bundle.hash, want=1, timeout=10)
        assert list(got) == ["dev1"] and not refused
        pool, refused = collect_prompts(devs["dev3"].subscribe(t.prompt_pool()), bundle_hash=bundle.hash, want=2,
                                        timeout=10)
        assert sorted(pool) == ["dev1", "dev2"] and not refused
        for d, m in zip(("dev1", "dev2"), members, strict=True):
            assert pool[d].info.description == "test shard" and pool[d].samples == 32
            for k, v in m.items():
                np.testing.assert_array_equal(pool[d].tensors[k], v)
        # a prompt made for another bundle is refused by the receiving device too
        other = encode_prompt(members[0], _info(bundle), bundle_hash="f" * 64, device_id="dev2", samples=8)
        send_prompt_to(devs["dev2"], t, "dev2", "dev3", other)
        got, refused = collect_prompts(direct, bundle_hash=bundle.hash, want=1, timeout=5)
        assert not got and "made for bundle" in refused["dev2"]
    finally:
        coord.close()


def test_ensemble_step_graph_trains_the_mix_of_pool_prompts(tiny_prompt_bundle, tmp_path):
    """The ensemble graph's first loss is the eval graph's loss of the mixed prompt; training lowers it;
    the result is a plain prompt state the eval graph scores."""
    import torch

    from device_runtime.prompt_ensemble import accuracy_of, mixed_prompt, prompt_name, train_embedding_mix
    from export.step_graph import mix_prompts

    bundle = tiny_prompt_bundle
    members = _members(bundle, K, seed=1)
    ds = load_dataset(_rows(tmp_path, 16), bundle.manifest, bundle.path("tokenizer.json"))
    pname = prompt_name(bundle)
    pool = np.stack([m[pname] for m in members])
    init = np.array([0.5, -0.2, 0.1], np.float32)
    np.testing.assert_allclose(mixed_prompt(init, pool), mix_prompts(torch.tensor(init), torch.tensor(pool)).numpy(),
                               atol=1e-6)
    head = {k: v for k, v in members[0].items() if k != pname}
    before = accuracy_of(bundle, {**head, pname: mixed_prompt(init, pool)}, ds)
    res = train_embedding_mix(bundle, members, ds, init_mix=init, init_head=members[0], epochs=1, batch_size=16,
                              lr=0.05)
    assert res.losses[0] == pytest.approx(before["loss"], rel=1e-4)
    res = train_embedding_mix(bundle, members, ds, init_mix=init, init_head=members[0], epochs=8, batch_size=16,
                              lr=0.05)
    assert res.losses[-1] < res.losses[0]
    assert not np.allclose(res.mix, init) and set(res.tensors) == set(bundle.manifest.trainable_names)
    after = accuracy_of(bundle, res.tensors, ds)
    assert after["loss"] < before["loss"]
    with pytest.raises(Exception, match="--prompt-pool 2"):
        train_embedding_mix(bundle, members[:2], ds, init_mix=init[:2], init_head=members[0])


def test_member_log_probs_in_length_order_match_each_row_alone(tiny_prompt_bundle, tmp_path):
    """Scoring in length-sorted batches puts every row's log-probabilities back in the file's order:
    the same as scoring each row on its own (no padding at all)."""
    from device_runtime.prompt_ensemble import log_softmax, member_log_probs
    from device_runtime.step_backend import StepBackend

    bundle = tiny_prompt_bundle
    members = _members(bundle, 2, seed=2)
    ds = load_dataset(_rows(tmp_path, 24), bundle.manifest, bundle.path("tokenizer.json"))
    assert len(set(ds.lengths.tolist())) > 3  # rows of different lengths, so the order matters
    got = member_log_probs(bundle, members, ds, batch_size=5)
    backend = StepBackend(bundle)
    for k, m in enumerate(members):
        backend.set_tensors(m)
        alone = np.concatenate([backend.logits(ds.batch(np.array([i]))) for i in range(len(ds))])
        np.testing.assert_allclose(got[k], log_softmax(alone.astype(np.float64)), atol=1e-4)


def test_fit_mix_finds_the_member_that_fits_and_its_gradient_is_exact():
    from device_runtime.prompt_ensemble import _nll_and_grad, ensemble_log_probs, fit_mix, log_softmax

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    good = np.where(np.eye(2)[labels] > 0, 2.0, -2.0)  # confident and right
    logp = np.stack([log_softmax(rng.normal(0, 1, (200, 2))), log_softmax(good), log_softmax(-good)])
    w = np.array([0.3, -0.1, 0.2])
    _, g = _nll_and_grad(logp, labels, w)
    eps = 1e-6
    for k in range(3):
        d = np.zeros(3)
        d[k] = eps
        num = (_nll_and_grad(logp, labels, w + d)[0] - _nll_and_grad(logp, labels, w - d)[0]) / (2 * eps)
        assert g[k] == pytest.approx(num, rel=1e-5, abs=1e-8)
    mix, losses = fit_mix(logp, labels, epochs=5, lr=0.1)
    assert int(np.argmax(mix)) == 1 and losses[-1] < losses[0]
    assert (ensemble_log_probs(logp, mix).argmax(-1) == labels).mean() == 1.0


def test_shared_prompt_round_trips_and_names_what_is_wrong(tiny_prompt_bundle):
    from device_runtime.errors import PayloadError
    from device_runtime.payload import encode_update

    bundle = tiny_prompt_bundle
    m = _members(bundle, 1)[0]
    p = decode_prompt(encode_prompt(m, _info(bundle), bundle_hash=bundle.hash, device_id="dev1", samples=5),
                      bundle_hash=bundle.hash)
    assert p.device == "dev1" and p.info.val_accuracy == 0.7 and p.samples == 5
    with pytest.raises(PayloadError, match="no 'prompt' description"):
        decode_prompt(encode_update(m, bundle_hash=bundle.hash, device_id="dev1"))
    with pytest.raises(Exception, match="val_accuracy"):
        _info(bundle, val_accuracy=1.5)


def test_prompt_pool_export_option_needs_a_soft_prompt_bundle():
    from export.config import ExportConfig
    from export.errors import ExportError

    for bad in ({"peft": "lora", "prompt_pool": 2}, {"peft": "prompt", "prompt_pool": -1},
                {"peft": "prompt", "prompt_pool": 2, "format": "ort-training"}):
        with pytest.raises(ExportError, match="--prompt-pool"):
            ExportConfig(num_labels=2, **bad)
