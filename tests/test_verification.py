"""The address-verification store: tokens, their lifetime, and what is persisted."""
import json
import stat
from pathlib import Path

import pytest

from reponotify.verification import (MAX_TOKENS_PER_ADDRESS, STATE_FILE, OpenRequest, VerificationError,
                                     VerificationStore, VerificationStoreError, Verified)


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> VerificationStore:
    return VerificationStore(tmp_path, ttl=3600, clock=clock)


def reason(store: VerificationStore, token: str) -> str:
    with pytest.raises(VerificationError) as info:
        store.verify(token)
    return info.value.reason


def test_issue_then_verify(store: VerificationStore) -> None:
    token = store.issue('acme/web', 'ops@example.com')
    assert not store.is_verified('acme/web', 'ops@example.com')

    assert store.verify(token) == Verified('acme/web', 'ops@example.com') == ('acme/web', 'ops@example.com')

    assert store.is_verified('acme/web', 'ops@example.com')
    assert not store.is_verified('acme/other', 'ops@example.com')  # per repository
    assert not store.is_verified('acme/web', 'dev@example.com')  # per address
    assert store.verified_addresses('acme/web') == ['ops@example.com']


def test_tokens_are_random_and_url_safe(store: VerificationStore) -> None:
    tokens = {store.issue('acme/web', 'ops@example.com') for _ in range(3)}
    assert len(tokens) == 3
    for token in tokens:
        assert len(token) >= 50
        assert all(character.isalnum() or character in '-_.' for character in token)


def test_a_token_is_single_use(store: VerificationStore) -> None:
    token = store.issue('acme/web', 'ops@example.com')
    store.verify(token)
    assert reason(store, token) == 'already used'
    assert str(pytest.raises(VerificationError, store.verify, token).value) == \
        "this verification link has already been used"


def test_a_token_expires(store: VerificationStore, clock: Clock) -> None:
    token = store.issue('acme/web', 'ops@example.com')
    clock.now += 3600
    assert reason(store, token) == 'expired'
    assert not store.is_verified('acme/web', 'ops@example.com')


def test_a_token_just_before_expiry_works(store: VerificationStore, clock: Clock) -> None:
    token = store.issue('acme/web', 'ops@example.com')
    clock.now += 3599.9
    assert store.verify(token) == ('acme/web', 'ops@example.com')


def test_expired_and_used_tokens_are_purged_after_another_ttl(store: VerificationStore, clock: Clock) -> None:
    expired = store.issue('acme/web', 'ops@example.com')
    used = store.issue('acme/web', 'dev@example.com')
    store.verify(used)
    clock.now += 2 * 3600
    assert reason(store, expired) == 'unknown'
    assert reason(store, used) == 'unknown'
    store.issue('acme/web', 'new@example.com')  # a write purges
    tokens = json.loads(store.path.read_text())['tokens']
    assert len(tokens) == 1
    assert store.is_verified('acme/web', 'dev@example.com')  # the verification itself stays


@pytest.mark.parametrize('token', [
    '', '.', 'nonsense', 'a.b', '..', 'x' * 1000, ' ',
])
def test_unknown_tokens(store: VerificationStore, token: str) -> None:
    store.issue('acme/web', 'ops@example.com')
    assert reason(store, token) == 'unknown'


def test_a_token_with_a_wrong_secret_is_unknown_and_harmless(store: VerificationStore) -> None:
    token = store.issue('acme/web', 'ops@example.com')
    token_id, _, secret = token.partition('.')
    assert reason(store, f"{token_id}.{secret[:-1]}{'A' if secret[-1] != 'A' else 'B'}") == 'unknown'
    assert reason(store, token_id) == 'unknown'
    assert reason(store, f"{token_id}.") == 'unknown'
    assert store.verify(token) == ('acme/web', 'ops@example.com')  # the real one still works


def test_a_non_string_token_is_unknown(store: VerificationStore) -> None:
    assert reason(store, None) == 'unknown'  # type: ignore[arg-type]


def test_the_domain_is_compared_case_insensitively(store: VerificationStore) -> None:
    store.verify(store.issue('acme/web', 'Ops@Example.COM'))
    assert store.is_verified('acme/web', 'Ops@example.com')
    assert not store.is_verified('acme/web', 'ops@example.com')  # the local part is case sensitive
    assert store.verified_addresses('acme/web') == ['Ops@example.com']


def test_several_links_for_one_address_each_work_once(store: VerificationStore) -> None:
    first = store.issue('acme/web', 'ops@example.com')
    second = store.issue('acme/web', 'ops@example.com')
    assert store.verify(second) == ('acme/web', 'ops@example.com')
    assert store.verify(first) == ('acme/web', 'ops@example.com')


def test_outstanding_links_per_address_are_bounded(store: VerificationStore, clock: Clock) -> None:
    tokens = []
    for _ in range(MAX_TOKENS_PER_ADDRESS + 2):
        tokens.append(store.issue('acme/web', 'ops@example.com'))
        clock.now += 1
    assert reason(store, tokens[0]) == 'unknown'
    assert reason(store, tokens[1]) == 'unknown'
    assert store.verify(tokens[2]) == ('acme/web', 'ops@example.com')
    other = store.issue('acme/web', 'dev@example.com')  # other addresses are not affected
    assert store.verify(other) == ('acme/web', 'dev@example.com')


def test_revoke(store: VerificationStore) -> None:
    store.verify(store.issue('acme/web', 'ops@example.com'))
    pending = store.issue('acme/web', 'ops@example.com')
    assert store.revoke('acme/web', 'ops@EXAMPLE.com') is True
    assert not store.is_verified('acme/web', 'ops@example.com')
    assert reason(store, pending) == 'unknown'
    assert store.revoke('acme/web', 'ops@example.com') is False
    assert store.verified_addresses('acme/web') == []


def test_state_survives_a_restart(tmp_path: Path, clock: Clock) -> None:
    first = VerificationStore(tmp_path, ttl=3600, clock=clock)
    first.verify(first.issue('acme/web', 'ops@example.com'))
    pending = first.issue('acme/web', 'dev@example.com')
    used = first.issue('acme/api', 'ops@example.com')
    first.verify(used)

    second = VerificationStore(tmp_path, ttl=3600, clock=clock)
    assert second.is_verified('acme/web', 'ops@example.com')
    assert second.is_verified('acme/api', 'ops@example.com')
    assert not second.is_verified('acme/web', 'dev@example.com')
    assert reason(second, used) == 'already used'
    assert second.verify(pending) == ('acme/web', 'dev@example.com')


def test_the_file_holds_no_token_and_is_private(store: VerificationStore) -> None:
    token = store.issue('acme/web', 'ops@example.com')
    token_id, _, secret = token.partition('.')
    text = store.path.read_text()
    assert store.path.name == STATE_FILE
    assert secret not in text and token not in text
    assert token_id in text  # the id alone verifies nothing
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert [path.name for path in store.path.parent.iterdir()] == [STATE_FILE]  # no temporary left behind


def test_a_copied_state_file_gives_no_usable_token(store: VerificationStore) -> None:
    store.issue('acme/web', 'ops@example.com')
    data = json.loads(store.path.read_text())
    [(token_id, record)] = data['tokens'].items()
    assert reason(store, f"{token_id}.{record['digest']}") == 'unknown'


def test_a_corrupt_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text('{not json')
    with pytest.raises(VerificationStoreError, match=r'email-verification\.json: not a verification state file.*'
                                                     r'move it away'):
        VerificationStore(tmp_path)


def test_a_file_of_another_version_is_refused(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text(json.dumps({'version': 99}))
    with pytest.raises(VerificationStoreError, match='version 1'):
        VerificationStore(tmp_path)


def test_the_state_folder_is_created(tmp_path: Path) -> None:
    store = VerificationStore(tmp_path / 'deep' / 'state')
    store.issue('acme/web', 'ops@example.com')
    assert (tmp_path / 'deep' / 'state' / STATE_FILE).exists()


def test_a_ttl_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match='ttl'):
        VerificationStore(tmp_path, ttl=0)


def test_issue_needs_a_repository_and_an_address(store: VerificationStore) -> None:
    with pytest.raises(ValueError):
        store.issue('', 'ops@example.com')
    with pytest.raises(ValueError):
        store.issue('acme/web', '')


def test_error_messages_are_clear() -> None:
    assert str(VerificationError('expired')) == "this verification link has expired: ask for a new one"
    assert VerificationError('unknown').reason == VerificationError.UNKNOWN == 'unknown'


def test_an_open_request_is_a_mailed_link_neither_used_nor_expired(store: VerificationStore, clock: Clock) -> None:
    token = store.issue('acme/web', 'ops@example.com')
    assert store.open_request('acme/web', 'ops@example.com') is None  # issued, not mailed yet
    clock.now += 10
    store.mark_sent(token)
    assert store.open_request('acme/web', 'ops@EXAMPLE.com') == OpenRequest(sent=clock.now, expires=clock.now + 3590)
    assert store.open_request('acme/api', 'ops@example.com') is None
    clock.now += 3590
    assert store.open_request('acme/web', 'ops@example.com') is None  # expired
    newer = store.issue('acme/web', 'ops@example.com')
    store.mark_sent(newer)
    store.verify(newer)
    assert store.open_request('acme/web', 'ops@example.com') is None  # used


def test_the_newest_open_request_counts_and_survives_a_restart(tmp_path: Path, clock: Clock) -> None:
    store = VerificationStore(tmp_path, ttl=3600, clock=clock)
    store.mark_sent(store.issue('acme/web', 'ops@example.com'))
    clock.now += 60
    store.mark_sent(store.issue('acme/web', 'ops@example.com'))
    store.mark_sent('unknown.token')  # ignored
    reopened = VerificationStore(tmp_path, ttl=3600, clock=clock)
    assert reopened.open_request('acme/web', 'ops@example.com') == OpenRequest(sent=clock.now,
                                                                               expires=clock.now + 3600)


def test_without_a_state_dir_the_store_lives_in_memory(tmp_path: Path, clock: Clock) -> None:
    store = VerificationStore(None, ttl=3600, clock=clock)
    assert store.path is None
    store.verify(store.issue('acme/web', 'ops@example.com'))
    assert store.is_verified('acme/web', 'ops@example.com')
    assert list(tmp_path.iterdir()) == []
