"""Roles from the allowed folder (re-read when it changes), the bind policy, per-client limits."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.broker.access import (
    DOMAIN_EVENTS_IN,
    DOMAIN_EVENTS_OUT,
    DOMAIN_MDP,
    KeyRing,
    OutstandingCounter,
    RoleCallback,
    may_publish,
)
from distill.broker.services.quota import ArtifactQuota
from distill.shared.bus.security import check_exposure, generate_keys, load_public_key
from distill.shared.errors import ArtifactError, ConfigError


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    generate_keys(tmp_path / "keys", ["laptop"], ["gpu"])
    return tmp_path / "keys"


def test_roles_come_from_the_folders_and_both_is_allowed(keys: Path) -> None:
    (keys / "allowed" / "workers" / "laptop.key").write_bytes((keys / "laptop.key").read_bytes())
    ring = KeyRing(keys / "allowed")
    assert ring.refresh()
    assert ring.roles(load_public_key(keys / "laptop.key")) == {"client", "worker"}
    assert ring.roles(load_public_key(keys / "gpu.key")) == {"worker"}
    assert ring.roles(load_public_key(keys / "broker.key")) == frozenset()
    assert not ring.refresh()  # nothing changed: nothing re-read


def test_an_admin_key_is_a_client_that_may_manage_every_job(tmp_path: Path) -> None:
    """``--admin NAME`` writes a pair whose public key goes in admins/ only; that role brings
    the client's with it (an admin need not be listed twice), and passes the MDP handshake."""
    keys = tmp_path / "keys"
    generate_keys(keys, ["laptop"], ["gpu"], ["boss"])
    assert sorted(p.name for p in (keys / "allowed" / "admins").iterdir()) == ["boss.key"]
    assert not (keys / "allowed" / "clients" / "boss.key").exists()
    ring = KeyRing(keys / "allowed")
    ring.refresh()
    boss = load_public_key(keys / "boss.key")
    assert ring.roles(boss) == {"admin", "client"}
    assert ring.roles(load_public_key(keys / "laptop.key")) == {"client"}
    assert ring.describe(boss.decode()) == f"'admins/boss.key' ({boss.decode()})"
    assert RoleCallback(ring).callback(DOMAIN_MDP, boss)
    assert not RoleCallback(ring).callback(DOMAIN_EVENTS_IN, boss)
    with pytest.raises(ConfigError, match="distinct"):
        generate_keys(tmp_path / "other", ["laptop"], ["gpu"], ["laptop"])


def test_deleting_a_key_file_revokes_it_without_a_restart(keys: Path) -> None:
    ring = KeyRing(keys / "allowed")
    ring.refresh()
    laptop = load_public_key(keys / "laptop.key")
    (keys / "allowed" / "clients" / "laptop.key").unlink()
    assert ring.refresh()
    assert ring.roles(laptop) == frozenset()


def test_a_broken_key_file_is_skipped_not_fatal(keys: Path) -> None:
    (keys / "allowed" / "clients" / "junk.key").write_text("not a certificate")
    ring = KeyRing(keys / "allowed")
    ring.refresh()
    assert ring.roles(load_public_key(keys / "laptop.key")) == {"client"}


def test_only_worker_keys_pass_the_events_in_handshake(keys: Path) -> None:
    ring = KeyRing(keys / "allowed")
    check = RoleCallback(ring)
    laptop, gpu = load_public_key(keys / "laptop.key"), load_public_key(keys / "gpu.key")
    assert check.callback(DOMAIN_MDP, laptop) and check.callback(DOMAIN_EVENTS_OUT, laptop)
    assert not check.callback(DOMAIN_EVENTS_IN, laptop)
    assert check.callback(DOMAIN_EVENTS_IN, gpu) and check.callback(DOMAIN_MDP, gpu)
    assert not check.callback(DOMAIN_MDP, load_public_key(keys / "broker.key"))
    assert check.rejected == 2


def test_control_and_broker_topics_are_the_broker_s_own() -> None:
    assert not may_publish("control.cancel") and not may_publish("broker")
    assert may_publish("job.abc") and may_publish("worker.w1") and may_publish("brokerage")


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "gpu-box"])
def test_a_public_address_without_curve_is_refused_with_how_to_make_keys(host: str) -> None:
    with pytest.raises(ConfigError, match="distill keys generate"):
        check_exposure(host, secure=False, insecure=False)
    check_exposure(host, secure=True, insecure=False)
    check_exposure(host, secure=False, insecure=True)  # allowed, with a warning


def test_loopback_needs_no_keys() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1"):
        check_exposure(host, secure=False, insecure=False)


def test_outstanding_requests_are_counted_per_owner() -> None:
    counter = OutstandingCounter(2)
    assert counter.admit(b"a") and counter.admit(b"a")
    assert not counter.admit(b"a")
    assert counter.admit(b"b")
    counter.release(b"a")
    assert counter.admit(b"a") and counter.count(b"a") == 2


def test_artifact_quota_is_per_key_persistent_and_freed_by_delete(tmp_path: Path) -> None:
    quota = ArtifactQuota(tmp_path / "quota.json", 100)
    quota.charge("k1", "a" * 64, 60)
    quota.charge("k1", "a" * 64, 60)  # a resumed upload is charged once
    with pytest.raises(
        ArtifactError, match="artifact quota exceeded for key k1: it stores 60 of 100"
    ):
        quota.charge("k1", "b" * 64, 41)
    quota.charge("k2", "b" * 64, 41)  # another key has its own quota
    again = ArtifactQuota(tmp_path / "quota.json", 100)
    assert again.usage("k1") == 60 and again.usage("k2") == 41
    again.forget("a" * 64)
    again.charge("k1", "b" * 64, 41)
    assert again.usage("k1") == 41
    with pytest.raises(ArtifactError, match="negative size"):
        again.charge("k1", "c" * 64, -5)


def test_the_quota_ledger_logs_changes_and_folds_them_into_its_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the whole ledger was written again at each upload and deletion (137 ms at
    100 000 artifacts, on the broker's loop)."""
    from distill.broker.services import quota as quota_module

    monkeypatch.setattr(quota_module, "COMPACT_MIN_LINES", 10)
    path = tmp_path / "quota.json"
    path.write_text('{"k1": {"' + "a" * 64 + '": 5}}')  # a ledger an earlier Distill wrote
    quota = ArtifactQuota(path, None)
    for i in range(25):
        quota.charge(f"k{i % 2}", f"{i:064x}", 10)
    for i in range(0, 25, 5):
        quota.forget(f"{i:064x}")
    lines = quota.log_path.read_text().splitlines()
    assert len(lines) < 10  # folded into the snapshot as it grew
    with open(quota.log_path, "a") as log:
        log.write('{"owner":"k1","sha":')  # a line torn by a crash
    again = ArtifactQuota(path, None)
    assert again.usage("k0") == quota.usage("k0") == 13 * 10 - 3 * 10
    assert again.usage("k1") == quota.usage("k1") == 5 + 12 * 10 - 2 * 10
