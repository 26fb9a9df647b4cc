"""The API key store: format, hashing, lifecycle, file permissions."""

from __future__ import annotations

import math
import os
import stat
from collections import Counter
from pathlib import Path

import pytest

from llmserve.auth.keys import (
    ID_HEX_DIGITS,
    KEY_PREFIX,
    KeyNotFound,
    KeyStore,
    hash_key,
    parse_key_id,
)


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    with KeyStore(tmp_path / "keys", now=lambda: 1_000.0) as opened:
        yield opened


def test_key_has_prefix_public_id_and_256_bits_of_secret(store: KeyStore) -> None:
    record, api_key = store.create("alice")
    assert api_key.startswith(f"{KEY_PREFIX}{record.id}-")
    assert len(record.id) == ID_HEX_DIGITS
    secret = api_key.split("-", 3)[3]
    counts = Counter(secret)
    # token_urlsafe(32): 43 base64url chars = 256 bits; a sanity check that it is not constant.
    assert len(secret) >= 43
    entropy = -sum(c / len(secret) * math.log2(c / len(secret)) for c in counts.values())
    assert entropy > 4.0
    assert parse_key_id(api_key) == record.id


def test_only_the_hash_is_stored(store: KeyStore, tmp_path: Path) -> None:
    record, api_key = store.create("alice")
    secret = api_key.split("-", 3)[3]
    assert record.key_hash == hash_key(api_key)
    blob = b"".join(p.read_bytes() for p in (tmp_path / "keys").rglob("*") if p.is_file())
    assert secret.encode() not in blob
    assert record.key_hash.encode() in blob  # the store really was written


def test_lookup_matches_only_the_exact_key(store: KeyStore) -> None:
    record, api_key = store.create("alice")
    assert store.lookup(api_key) == record
    assert store.lookup(api_key[:-1] + ("A" if api_key[-1] != "A" else "B")) is None
    assert store.lookup(f"{KEY_PREFIX}{'0' * ID_HEX_DIGITS}-{'x' * 43}") is None
    assert store.lookup("not-a-key") is None
    assert store.lookup(f"{KEY_PREFIX}XYZ") is None


def test_record_fields_round_trip(store: KeyStore) -> None:
    record, _ = store.create(
        "svc", tier="pro", models=["a", "b"], expires=2_000.0, admin=True,
        limits={"tokens_per_minute": 1000},
    )  # fmt: skip
    again = store.get(record.id)
    assert again == record
    assert again.models == ("a", "b")
    assert again.created == 1_000.0
    assert again.limits == {"tokens_per_minute": 1000}
    assert again.is_expired(2_000.0) and not again.is_expired(1_999.0)
    assert "key_hash" not in again.public_dict()


def test_revoke_keeps_the_record_and_marks_it(store: KeyStore) -> None:
    record, api_key = store.create("alice")
    revoked = store.revoke(record.id)
    assert revoked.revoked == 1_000.0
    assert store.lookup(api_key).revoked == 1_000.0  # found, so the caller can refuse it
    assert [r.id for r in store.list()] == [record.id]


def test_rotate_replaces_the_secret_and_keeps_the_record(store: KeyStore) -> None:
    record, old_key = store.create("alice", tier="pro", limits={"tokens_per_day": 5})
    rotated, new_key = store.rotate(record.id)
    assert new_key != old_key and parse_key_id(new_key) == record.id
    assert store.lookup(old_key) is None
    assert store.lookup(new_key) == rotated
    assert (rotated.tier, rotated.limits, rotated.created) == (
        "pro",
        {"tokens_per_day": 5},
        1_000.0,
    )


def test_unknown_id_raises_key_not_found(store: KeyStore) -> None:
    for action in (store.get, store.revoke, store.rotate):
        with pytest.raises(KeyNotFound):
            action("000000000000")


def test_last_used_is_stored_apart_and_does_not_undo_a_revocation(tmp_path: Path) -> None:
    with KeyStore(tmp_path / "keys") as server, KeyStore(tmp_path / "keys") as cli:
        record, _ = cli.create("alice")
        cli.revoke(record.id)
        server.touch({record.id: 1234.5})
        after = cli.get(record.id)
    assert after.last_used == 1234.5
    assert after.revoked is not None


def test_list_is_ordered_by_creation_and_excludes_internal_entries(tmp_path: Path) -> None:
    times = iter([1.0, 2.0, 3.0])
    with KeyStore(tmp_path / "keys", now=lambda: next(times)) as store:
        ids = [store.create(name)[0].id for name in ("a", "b", "c")]
        assert [r.id for r in store.list()] == ids


def test_store_directory_is_0700_and_files_0600(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)  # a typical permissive umask must not matter
    try:
        with KeyStore(tmp_path / "state" / "keys") as store:
            store.create("alice")
            store.touch({"x": 1.0})
    finally:
        os.umask(old_umask)
    directory = tmp_path / "state" / "keys"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    files = [p for p in directory.rglob("*") if p.is_file()]
    assert files, "the store wrote nothing"
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o600 for p in files}


def test_existing_directory_is_tightened(tmp_path: Path) -> None:
    directory = tmp_path / "keys"
    directory.mkdir(mode=0o755)
    KeyStore(directory).close()
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
