"""`deft edge broker`, broker URLs and the broker factory."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from device_runtime.protocol.errors import ConnectError
from device_runtime.protocol.url import parse_broker_url
from edge_broker.broker import BrokerError, load_accounts, make_accounts
from edge_broker.broker.external import ExternalBroker
from edge_broker.cli import app


def test_cli_starts_mosquitto_writes_accounts_and_stops(mosquitto_binary, tmp_path):
    r = CliRunner().invoke(app, ["broker", "--devices", "pi-1,pi-2", "--workdir", str(tmp_path), "--port", "0",
                                 "--fleet", "lab", "--run-for", "0.3", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["broker"] == "mosquitto" and summary["devices"] == ["pi-1", "pi-2"]
    assert "deft/v1/lab/#" in summary["watch"]
    accounts = load_accounts(tmp_path / "accounts.json")
    assert {a.username for a in accounts} == {"edge", "pi-1", "pi-2"}
    assert (tmp_path / "accounts.json").stat().st_mode & 0o077 == 0  # secrets readable by the owner only
    # a second run keeps the existing passwords and adds the new device
    r2 = CliRunner().invoke(app, ["broker", "--devices", "pi-3", "--workdir", str(tmp_path), "--port", "0",
                                  "--run-for", "0.1", "--json"])
    assert r2.exit_code == 0, r2.output
    again = {a.username: a.password for a in load_accounts(tmp_path / "accounts.json")}
    assert again["pi-1"] == {a.username: a.password for a in accounts}["pi-1"] and "pi-3" in again


@pytest.mark.parametrize("args, msg", [
    (["--devices", "a/b"], "invalid device id 'a/b'"),
    (["--kind", "rabbit"], "'rabbit' is not one of"),
    (["--port", "70000"], "out of range"),
    (["--tls-cert", "x.pem"], "both --tls-cert and --tls-key"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, args, msg):
    r = CliRunner().invoke(app, ["broker", "--workdir", str(tmp_path), "--run-for", "0.1", *args])
    assert r.exit_code == 2
    assert msg in r.output and "Traceback" not in r.output


def test_broker_urls():
    u = parse_broker_url("mqtts://pi%401:s3cret@edge.local")
    assert (u.scheme, u.host, u.port, u.username, u.password, u.tls) == ("mqtts", "edge.local", 8883, "pi@1",
                                                                         "s3cret", True)
    assert str(u) == "mqtts://edge.local:8883"  # no password in logs
    assert parse_broker_url("mqtt://127.0.0.1:1999").port == 1999
    for bad, msg in [("http://x", "scheme must be"), ("mqtt://", "no host"), ("mqtt://h:99999", "invalid broker URL"),
                     ("mqtt://h/path", "no path")]:
        with pytest.raises(ConnectError, match=msg):
            parse_broker_url(bad)


def test_external_broker_only_connects(mosquitto_broker):
    b = mosquitto_broker.broker
    ext = ExternalBroker(f"mqtt://edge:pw@{b.host}:{b.port}")
    assert ext.url == b.url and ext.username == "edge"
    ext.stop()  # no-op: the kit does not own it
    assert b.is_running()
    with pytest.raises(BrokerError, match="only connects"):
        ext.restart()
    with pytest.raises(BrokerError, match="nothing accepts connections"):
        ExternalBroker("mqtt://127.0.0.1:1")


def test_accounts_refuse_duplicates_and_bad_passwords():
    with pytest.raises(BrokerError, match="duplicate"):
        make_accounts(["a", "a"])
    with pytest.raises(BrokerError, match="contains ':'"):
        make_accounts(["a"], passwords={"a": "x:y"})
