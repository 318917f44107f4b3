"""Tenants and their API keys. A key is shown once, at creation; only its SHA-256 is stored."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time

from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.tenants import repository
from app.tenants.exceptions import Unauthorized
from app.tenants.models import ApiKey, Tenant

KEY_PREFIX = "dsk_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    name = name.strip()
    if not name:
        raise ValueError("tenant name must not be empty")
    tenant = repository.get_tenant_by_name(session, name)
    if tenant is None:
        tenant = Tenant(name=name)
        session.add(tenant)
        session.flush()
    return tenant


def create_key(session: Session, tenant_name: str) -> str:
    """Create a key for `tenant_name` (creating the tenant if new) and return the plaintext key."""
    tenant = get_or_create_tenant(session, tenant_name)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(tenant_id=tenant.id, key_hash=hash_key(key), prefix=key[:12]))
    session.flush()
    return key


def revoke_key(session: Session, key: str) -> bool:
    row = repository.get_active_key(session, hash_key(key))
    if row is None:
        return False
    row.revoked_at = utcnow()
    session.flush()
    return True


def authenticate(session: Session, key: str) -> str:
    """The tenant id that owns `key`; `Unauthorized` for unknown or revoked keys."""
    row = repository.get_active_key(session, hash_key(key))
    if row is None:
        raise Unauthorized("the API key is not valid")
    return row.tenant_id


class KeyCache:
    """Per-process memory of recently authenticated keys, so a hot read path skips one query.

    Only hashes are kept. A revoked key keeps working in a process for at most `ttl` seconds.
    """

    def __init__(self, ttl: float, max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def get(self, key_hash: str) -> str | None:
        entry = self._entries.get(key_hash)
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

    def put(self, key_hash: str, tenant_id: str) -> None:
        if self.ttl <= 0:
            return
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            self._entries[key_hash] = (tenant_id, time.monotonic() + self.ttl)
