"""Key files and where a process finds its keys: flags, then environment, then config file."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import zmq.auth

from distill.shared.bus import security as S
from distill.shared.errors import ConfigError


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    S.generate_keys(tmp_path / "keys", ["laptop"], ["gpu"])
    return tmp_path / "keys"


@pytest.fixture(autouse=True)
def no_ambient_keys(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in (S.ENV_BROKER_KEY, S.ENV_KEY, S.ENV_BROKER_SECRET_KEY, S.ENV_ALLOWED_KEYS):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(S.ENV_CONFIG, str(tmp_path / "no-such-keys.json"))


def test_generate_writes_private_secrets_and_the_allowed_folder(keys: Path) -> None:
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    for name in ("broker", "laptop", "gpu"):
        assert stat.S_IMODE((keys / f"{name}.key_secret").stat().st_mode) == 0o600
        public, secret = zmq.auth.load_certificate(keys / f"{name}.key_secret")
        assert secret is not None and public == S.load_public_key(keys / f"{name}.key")
    assert sorted(p.name for p in (keys / "allowed" / "clients").iterdir()) == ["laptop.key"]
    assert sorted(p.name for p in (keys / "allowed" / "workers").iterdir()) == ["gpu.key"]
    assert not list((keys / "allowed").rglob("*.key_secret"))  # no secret ever lands there


def test_generate_refuses_to_overwrite_a_key_pair(keys: Path) -> None:
    before = (keys / "broker.key_secret").read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        S.generate_keys(keys, ["other"], ["gpu"])
    assert (keys / "broker.key_secret").read_bytes() == before


def test_add_puts_one_more_pair_in_the_allowed_folder_under_its_role(keys: Path) -> None:
    written = S.add_key(keys, "studio", "admin")
    assert [p.relative_to(keys).as_posix() for p in written] == [
        "studio.key", "studio.key_secret", "allowed/admins/studio.key"]
    assert stat.S_IMODE((keys / "studio.key_secret").stat().st_mode) == 0o600
    assert S.load_public_key(keys / "allowed" / "admins" / "studio.key") == S.load_public_key(
        keys / "studio.key")
    before = (keys / "studio.key_secret").read_bytes()
    for name, role, problem in (("studio", "client", "already exists"),
                                ("../evil", "client", "key name '../evil'"),
                                ("broker", "client", "not 'broker'"),
                                ("x", "boss", "unknown role 'boss'")):
        with pytest.raises(ConfigError, match=problem):
            S.add_key(keys, name, role)
    assert (keys / "studio.key_secret").read_bytes() == before
    assert not (keys.parent / "evil.key").exists()
    with pytest.raises(ConfigError, match="no allowed/ folder"):
        S.add_key(keys.parent, "x", "client")
    with pytest.raises(ConfigError, match="key name 'a/b'"):
        S.generate_keys(keys.parent / "other", ["a/b"], ["gpu"])


def test_a_secret_key_others_can_read_is_refused(keys: Path) -> None:
    (keys / "laptop.key_secret").chmod(0o644)
    with pytest.raises(ConfigError, match="readable by other users: chmod 600"):
        S.load_key_pair(keys / "laptop.key_secret")


def test_a_public_key_file_is_not_a_key_pair(keys: Path) -> None:
    with pytest.raises(ConfigError, match="holds no secret key"):
        S.load_key_pair(keys / "laptop.key")
    with pytest.raises(ConfigError, match="distill keys generate"):
        S.load_public_key(keys / "missing.key")


def test_no_keys_anywhere_means_a_plain_connection() -> None:
    assert S.client_security() is None
    assert S.broker_security() is None


def test_config_file_then_environment_then_arguments(
    keys: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "keys.json"
    config.write_text(
        json.dumps(
            {
                "broker_key": str(keys / "broker.key"),
                "key": str(keys / "laptop.key_secret"),
                "broker": {
                    "secret_key": str(keys / "broker.key_secret"),
                    "allowed": str(keys / "allowed"),
                },
            }
        )
    )
    monkeypatch.setenv(S.ENV_CONFIG, str(config))
    laptop = S.load_key_pair(keys / "laptop.key_secret")[0]
    gpu = S.load_key_pair(keys / "gpu.key_secret")[0]
    server = S.load_public_key(keys / "broker.key")
    found = S.client_security()
    assert found is not None and (found.server_key, found.public_key) == (server, laptop)
    monkeypatch.setenv(S.ENV_KEY, str(keys / "gpu.key_secret"))
    found = S.client_security()
    assert found is not None and found.public_key == gpu
    found = S.client_security(key=keys / "laptop.key_secret")
    assert found is not None and found.public_key == laptop
    broker = S.broker_security()
    assert (
        broker is not None
        and broker.public_key == server
        and broker.allowed_dir == keys / "allowed"
    )


def test_half_a_configuration_is_an_error(keys: Path) -> None:
    with pytest.raises(ConfigError, match="this machine's key pair"):
        S.client_security(broker_key=keys / "broker.key")
    with pytest.raises(ConfigError, match="--allowed"):
        S.broker_security(secret_key=keys / "broker.key_secret")


def test_a_config_file_that_is_not_json_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = tmp_path / "keys.json"
    bad.write_text("broker_key = 'toml?'")
    monkeypatch.setenv(S.ENV_CONFIG, str(bad))
    with pytest.raises(ConfigError, match="not valid JSON"):
        S.client_security()


def test_the_config_file_can_name_keys_per_broker(
    keys: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "keys.json"
    config.write_text(
        json.dumps(
            {
                "broker_key": str(keys / "broker.key"),
                "key": str(keys / "laptop.key_secret"),
                "brokers": {
                    "gpu-box": {
                        "broker_key": str(keys / "broker.key"),
                        "key": str(keys / "gpu.key_secret"),
                    },
                    "127.0.0.1:5555": {},
                },
            }
        )
    )
    monkeypatch.setenv(S.ENV_CONFIG, str(config))
    gpu = S.load_key_pair(keys / "gpu.key_secret")[0]
    laptop = S.load_key_pair(keys / "laptop.key_secret")[0]
    found = S.client_security(endpoint="tcp://gpu-box:5555")
    assert found is not None and found.public_key == gpu
    assert S.client_security(endpoint="tcp://127.0.0.1:5555") is None  # a local plain broker
    found = S.client_security(endpoint="tcp://elsewhere:5555")
    assert found is not None and found.public_key == laptop  # the top level for the rest
    assert S.resolve(S.AUTO, "tcp://127.0.0.1:5555") is None
