"""The topic tree: every builder parses back to what built it; ids cannot widen ACLs."""

import pytest
from paho.mqtt.client import topic_matches_sub as topic_matches

from device_runtime.protocol.errors import TopicError
from device_runtime.protocol.topics import Topics, acl_patterns, parse_topic

T = Topics("lab")


@pytest.mark.parametrize(
    "topic, expect",
    [
        (T.hello("pi-1"), ("device", "hello", "pi-1", None, None)),
        (T.heartbeat("pi-1"), ("device", "heartbeat", "pi-1", None, None)),
        (T.status("pi-1"), ("device", "status", "pi-1", None, None)),
        (T.update("pi-1", 7), ("device", "update", "pi-1", 7, None)),
        (T.device_ack("pi-1"), ("device", "ack", "pi-1", None, None)),
        (T.bundle_request("pi-1"), ("device", "bundle-request", "pi-1", None, None)),
        (T.prompt("pi-1"), ("device", "prompt", "pi-1", None, None)),
        (T.task_for("pi-1", 2), ("to", "task", "pi-1", 2, None)),
        (T.ack_to("pi-1"), ("to", "ack", "pi-1", None, None)),
        (T.bundle_to("pi-1", "ab12"), ("to", "bundle", "pi-1", None, "ab12")),
        (T.task_all(3), ("all", "task", None, 3, None)),
        (T.global_state(), ("all", "global", None, None, None)),
        (T.bundle_all("ab12"), ("all", "bundle", None, None, "ab12")),
        (T.prompts_relay("pi-2"), ("all", "prompts", "pi-2", None, None)),
    ],
)
def test_every_topic_parses_back(topic, expect):
    info = parse_topic(topic)
    assert topic.startswith("deft/v1/lab/")
    assert (info.direction, info.kind, info.device, info.round, info.token) == expect
    assert info.fleet == "lab"


@pytest.mark.parametrize("bad", ["a/b", "+", "#", "dev 1", "", "x" * 65, "dev#1"])
def test_ids_that_would_break_topics_or_acls_are_refused(bad):
    with pytest.raises(TopicError, match="invalid device id"):
        T.update(bad, 1)


@pytest.mark.parametrize(
    "topic, msg",
    [
        ("deft/v2/lab/all/global", "this kit speaks v1"),
        ("other/v1/lab/all/global", "not a deft topic"),
        ("deft/v1/lab/device/pi-1/update/x", "not an integer"),
        ("deft/v1/lab/device/pi-1/teleport", "unknown kind"),
        ("deft/v1/lab/sideways/pi-1/hello", "unknown direction"),
        ("deft/v1/lab/all/global/extra", "wrong number of segments"),
    ],
)
def test_foreign_topics_are_named(topic, msg):
    with pytest.raises(TopicError, match=msg):
        parse_topic(topic)


def test_negative_round_refused():
    with pytest.raises(TopicError, match="round"):
        T.update("pi-1", -1)


def test_subscription_filters_match_exactly_their_topics():
    assert topic_matches(T.from_devices("update"), T.update("pi-1", 3))
    assert not topic_matches(T.from_devices("update"), T.hello("pi-1"))
    assert topic_matches(T.from_devices(), T.hello("pi-1"))
    inbox = T.device_inbox("pi-1")
    assert any(topic_matches(f, T.task_for("pi-1", 1)) for f in inbox)
    assert any(topic_matches(f, T.global_state()) for f in inbox)
    assert not any(topic_matches(f, T.task_for("pi-2", 1)) for f in inbox)
    assert not any(topic_matches(f, T.update("pi-1", 1)) for f in inbox)


def test_acl_patterns_confine_a_device_to_its_subtree():
    acl = acl_patterns("lab", "pi-1")
    assert acl["write"] == ["deft/v1/lab/device/pi-1/#"]
    assert all(topic_matches(f, T.update("pi-1", 1)) for f in acl["write"])
    assert not any(topic_matches(f, T.update("pi-2", 1)) for f in acl["write"])
    assert not any(topic_matches(f, T.global_state()) for f in acl["write"])
    assert any(topic_matches(f, T.global_state()) for f in acl["read"])
    assert not any(topic_matches(f, T.ack_to("pi-2")) for f in acl["read"])
    assert acl_patterns("lab")["write"] == ["deft/v1/lab/device/%u/#"]
