"""
E-mail address verification: which addresses may be mailed for which repository.

Quay mails an address for a repository only once someone holding that address
has followed a link sent to it. This module keeps that state; it sends nothing
and serves nothing (the e-mail method and an HTTP endpoint build on it).

* :meth:`VerificationStore.issue` makes a token for (repository, address): random
  (:func:`secrets.token_urlsafe`), single use, expiring after ``ttl`` seconds.
* :meth:`VerificationStore.verify` takes a token back and, if it is good, marks the
  pair verified and returns it; otherwise it raises :class:`VerificationError`
  whose ``reason`` is ``'expired'``, ``'already used'`` or ``'unknown'``.
* :meth:`VerificationStore.is_verified` answers whether the pair was verified.
* :meth:`VerificationStore.mark_sent` records that a token's link was mailed, and
  :meth:`VerificationStore.open_request` answers whether a mailed link for the pair
  is still open (unused, unexpired): then no new mail is needed, whatever restarts.

A token is ``<id>.<secret>``. The state file keeps the id and a SHA-256 hash of
the secret, never the token itself, so reading the file gives no usable link;
the presented secret is compared with :func:`hmac.compare_digest`. Used and
expired tokens are kept for another ``ttl`` so that a second click says
"already used" or "expired" rather than "unknown", then purged.

Addresses are compared with the domain in lower case (the local part is case
sensitive by the standard, so it is kept as written). The state lives in one
JSON file, ``<state-dir>/email-verification.json`` (mode 0600), replaced
atomically on every change (or nowhere, with ``state_dir=None``: in memory only). The methods are synchronous and small: call them
from the event loop (one writer per process; the operator runs one leader).
"""
import dataclasses
import datetime
import hashlib
import hmac
import json
import os
import pathlib
import secrets
import tempfile
import time
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

STATE_FILE = 'email-verification.json'
DEFAULT_TTL = 24 * 3600.0  # seconds a verification link stays valid
MAX_TOKENS_PER_ADDRESS = 5  # outstanding links per (repository, address); older ones are dropped
_FORMAT_VERSION = 1
_MAX_TOKEN_LENGTH = 128


class VerificationError(Exception):
    """A token that does not verify anything; ``reason`` says why."""
    EXPIRED: ClassVar[str] = 'expired'
    ALREADY_USED: ClassVar[str] = 'already used'
    UNKNOWN: ClassVar[str] = 'unknown'

    _MESSAGES: ClassVar[dict[str, str]] = {
        'expired': "this verification link has expired: ask for a new one",
        'already used': "this verification link has already been used",
        'unknown': "this verification link is not known (mistyped, replaced by newer links, or long expired)",
    }

    def __init__(self, reason: str) -> None:
        super().__init__(self._MESSAGES[reason])
        self.reason = reason


class VerificationStoreError(Exception):
    """The state file cannot be used; the message names the file and what to do."""


class Verified(NamedTuple):
    """What a good token verified."""
    repository: str
    address: str


class OpenRequest(NamedTuple):
    """A mailed link that can still be used: when it was mailed and until when it works (epoch seconds)."""
    sent: float
    expires: float


def normalise_address(address: str) -> str:
    """The address as compared: domain in lower case, local part as written."""
    local, at, domain = address.strip().rpartition('@')
    return f"{local}@{domain.lower()}" if at else address.strip()


@dataclasses.dataclass
class _Token:
    digest: str  # hex SHA-256 of the token's secret part
    repository: str
    address: str
    expires: float
    used: float | None = None
    sent: float | None = None  # when its link was mailed


class VerificationStore:
    """Verified (repository, address) pairs and the outstanding tokens, persisted as JSON."""

    def __init__(self, state_dir: pathlib.Path | str | None, *, ttl: float = DEFAULT_TTL,
                 clock: Callable[[], float] = time.time) -> None:
        if not ttl > 0:
            raise ValueError("ttl must be a positive number of seconds")
        self.path = pathlib.Path(state_dir) / STATE_FILE if state_dir is not None else None
        self.ttl = float(ttl)
        self._clock = clock
        self._verified: dict[str, dict[str, float]] = {}  # repository -> address -> when verified
        self._tokens: dict[str, _Token] = {}  # token id -> token
        self._load()

    # -- the API ---------------------------------------------------------------------------------

    def issue(self, repository: str, address: str) -> str:
        """A new single-use token verifying ``address`` for ``repository``, valid for ``ttl`` seconds."""
        if not repository or not address:
            raise ValueError("a repository and an address are needed")
        address = normalise_address(address)
        now = self._clock()
        token_id = secrets.token_urlsafe(12)
        while token_id in self._tokens:  # 96 random bits: never in practice
            token_id = secrets.token_urlsafe(12)
        secret = secrets.token_urlsafe(32)
        self._purge(now)
        self._tokens[token_id] = _Token(digest=_digest(secret), repository=repository, address=address,
                                        expires=now + self.ttl)
        self._limit_outstanding(repository, address)
        self._save()
        return f"{token_id}.{secret}"

    def verify(self, token: str) -> Verified:
        """
        Use a token: marks its (repository, address) verified and returns it.

        Raises :class:`VerificationError` (reason ``'unknown'``, ``'expired'`` or
        ``'already used'``); a failed attempt changes nothing.
        """
        record = self._lookup(token)
        now = self._clock()
        if record.used is not None:
            raise VerificationError(VerificationError.ALREADY_USED)
        if now >= record.expires:
            raise VerificationError(VerificationError.EXPIRED)
        record.used = now
        self._verified.setdefault(record.repository, {})[record.address] = now
        self._purge(now)
        self._save()
        return Verified(record.repository, record.address)

    def is_verified(self, repository: str, address: str) -> bool:
        """Whether ``address`` was verified for ``repository`` (and not revoked since)."""
        return normalise_address(address) in self._verified.get(repository, {})

    def revoke(self, repository: str, address: str) -> bool:
        """Forget a verification and the pair's outstanding tokens; returns whether it was verified."""
        address = normalise_address(address)
        addresses = self._verified.get(repository, {})
        was = addresses.pop(address, None) is not None
        if not addresses:
            self._verified.pop(repository, None)
        stale = [token_id for token_id, record in self._tokens.items()
                 if (record.repository, record.address) == (repository, address)]
        for token_id in stale:
            del self._tokens[token_id]
        if was or stale:
            self._save()
        return was

    def verified_addresses(self, repository: str) -> list[str]:
        """The addresses verified for a repository, sorted."""
        return sorted(self._verified.get(repository, {}))

    def mark_sent(self, token: str) -> None:
        """Record that the token's link was mailed (an unknown or purged token is ignored)."""
        record = self._tokens.get(token.partition('.')[0]) if isinstance(token, str) else None
        if record is not None and record.sent is None:
            record.sent = self._clock()
            self._save()

    def open_request(self, repository: str, address: str) -> OpenRequest | None:
        """The newest mailed link for the pair that is neither used nor expired, if any."""
        address = normalise_address(address)
        now = self._clock()
        candidates = [OpenRequest(record.sent, record.expires) for record in self._tokens.values()
                      if (record.repository, record.address) == (repository, address)
                      and record.used is None and record.sent is not None and now < record.expires]
        return max(candidates, key=lambda request: request.sent, default=None)

    # -- internals -------------------------------------------------------------------------------

    def _lookup(self, token: str) -> _Token:
        if not isinstance(token, str) or len(token) > _MAX_TOKEN_LENGTH:
            raise VerificationError(VerificationError.UNKNOWN)
        token_id, dot, secret = token.strip().partition('.')
        record = self._tokens.get(token_id) if dot and secret else None
        # Always compare, even without a record, so that timing does not tell ids apart.
        expected = record.digest if record is not None else _digest('')
        if not hmac.compare_digest(_digest(secret), expected) or record is None:
            raise VerificationError(VerificationError.UNKNOWN)
        if self._clock() >= record.expires + self.ttl:
            raise VerificationError(VerificationError.UNKNOWN)  # past retention: as if already purged
        return record

    def _limit_outstanding(self, repository: str, address: str) -> None:
        outstanding = sorted(
            ((record.expires, token_id) for token_id, record in self._tokens.items()
             if (record.repository, record.address) == (repository, address) and record.used is None),
            reverse=True)
        for _, token_id in outstanding[MAX_TOKENS_PER_ADDRESS:]:
            del self._tokens[token_id]

    def _purge(self, now: float) -> None:
        """Drop tokens whose retention (expiry plus another ``ttl``) is over."""
        for token_id in [token_id for token_id, record in self._tokens.items()
                         if now >= record.expires + self.ttl]:
            del self._tokens[token_id]

    def _load(self) -> None:
        if self.path is None:
            return
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise VerificationStoreError(f"{self.path}: cannot read the verification state ({exc.strerror})") from None
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get('version') != _FORMAT_VERSION:
                raise ValueError(f"expected a JSON object with version {_FORMAT_VERSION}")
            verified = {str(repository): {str(address): float(when) for address, when in addresses.items()}
                        for repository, addresses in data.get('verified', {}).items()}
            tokens = {str(token_id): _Token(
                digest=str(record['digest']), repository=str(record['repository']),
                address=str(record['address']), expires=float(record['expires']),
                used=None if record.get('used') is None else float(record['used']),
                sent=None if record.get('sent') is None else float(record['sent']))
                for token_id, record in data.get('tokens', {}).items()}
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise VerificationStoreError(
                f"{self.path}: not a verification state file ({exc}); move it away to start afresh "
                "(every address will need verifying again)") from None
        self._verified, self._tokens = verified, tokens

    def _save(self) -> None:
        if self.path is None:
            return
        data: dict[str, Any] = {
            'version': _FORMAT_VERSION,
            'verified': self._verified,
            'tokens': {token_id: dataclasses.asdict(record) for token_id, record in self._tokens.items()},
            'written': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ'),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(prefix='.email-verification.', suffix='.tmp', dir=self.path.parent)
        try:
            with os.fdopen(descriptor, 'w') as file:  # mkstemp creates it 0600
                json.dump(data, file, indent=2, sort_keys=True)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            pathlib.Path(temporary).unlink(missing_ok=True)
            raise


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
