"""Device-to-device prompt transfer on a REAL Mosquitto: the ACL lets device A write only its own
``device/A/prompt-to/<peer>`` and lets only the peer read it; no other topic of another device opens up."""

from __future__ import annotations

import pytest

from device_runtime.protocol.envelope import Envelope
from device_runtime.protocol.errors import PublishRefused, SubscribeRefused
from tests._broker import FLEET
from tests.test_broker_mosquitto import _nothing_arrives

pytestmark = pytest.mark.mosquitto


def _prompt(sender: str) -> Envelope:
    return Envelope.build("prompt", sender=sender, fleet=FLEET, body=b"prompt tensors", content="bytes")


def _snoop_gets_nothing(client, filter_: str, send) -> bool:
    """Subscribing to ``filter_`` is refused, or what ``send()`` then publishes does not arrive."""
    try:
        q = client.subscribe(filter_)
    except SubscribeRefused:
        return True
    send()
    return _nothing_arrives(q)


def test_direct_prompt_reaches_only_its_peer(mosquitto_broker, mqtt_client):
    t = mosquitto_broker.topics
    dev1, dev2, dev3 = (mqtt_client(mosquitto_broker, d) for d in ("dev1", "dev2", "dev3"))
    inbox2 = dev2.subscribe(t.prompts_for("dev2"))
    inbox3 = dev3.subscribe(t.prompts_for("dev3"))
    dev1.publish(t.prompt_to("dev1", "dev2"), _prompt("dev1"))
    got = inbox2.get(timeout=5)
    assert got.info.kind == "prompt-to" and got.info.device == "dev1" and got.info.token == "dev2"
    assert got.envelope.body == b"prompt tensors"
    assert _nothing_arrives(inbox3)
    # dev3 cannot read dev2's direct prompts, nor every device's prompt-to topics
    for snoop in (f"deft/v1/{FLEET}/device/+/prompt-to/dev2", f"deft/v1/{FLEET}/device/dev1/prompt-to/+",
                  f"deft/v1/{FLEET}/device/+/prompt-to/#"):
        assert _snoop_gets_nothing(dev3, snoop, lambda: dev1.publish(t.prompt_to("dev1", "dev2"), _prompt("dev1")))

    def send_others() -> None:
        dev1.publish(t.prompt("dev1"), _prompt("dev1"))
        dev1.publish(t.update("dev1", 1), Envelope.build("update", sender="dev1", fleet=FLEET, round=1))

    # the read pattern opens nothing else of another device's subtree
    for other in (f"deft/v1/{FLEET}/device/dev1/prompt", f"deft/v1/{FLEET}/device/dev1/update/+",
                  f"deft/v1/{FLEET}/device/+/hello"):
        assert _snoop_gets_nothing(dev2, other, send_others), other


def test_a_device_cannot_write_into_another_devices_prompt_topics(mosquitto_broker, mqtt_client):
    t = mosquitto_broker.topics
    dev2 = mqtt_client(mosquitto_broker, "dev2")
    inbox2 = dev2.subscribe(t.prompts_for("dev2"))
    edge = mqtt_client(mosquitto_broker, "edge")
    pool = edge.subscribe(t.from_devices("prompt"))
    dev3 = mqtt_client(mosquitto_broker, "dev3")
    # impersonating dev1 towards dev2, or writing dev1's pool entry, or the edge's relay: refused
    for topic in (t.prompt_to("dev1", "dev2"), t.prompt("dev1"), t.prompts_relay("dev3")):
        with pytest.raises(PublishRefused):
            dev3.publish(topic, _prompt("dev3"))
    assert _nothing_arrives(inbox2) and _nothing_arrives(pool, 0.2)
    # the one allowed direct topic works
    dev3.publish(t.prompt_to("dev3", "dev2"), _prompt("dev3"))
    assert inbox2.get(timeout=5).info.device == "dev3"
