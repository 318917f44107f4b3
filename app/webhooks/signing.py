"""Per-tenant webhook secrets and the `Distill-Signature` header.

A tenant's secret is HMAC-SHA256(root, tenant id), so it needs no table and every process (API, each
worker) derives the same one; the root is `DISTILL_WEBHOOK_SECRET`, or in development a random file under the
data folder. The signature follows the common `t=<unix time>,v1=<hex>` scheme over `"<t>.<body>"`: the
timestamp inside the MAC lets a receiver refuse replays of an old delivery.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path

from app.config import Settings
from app.errors import ServiceUnavailable

ROOT_FILE = "webhook_root_secret"
HEADER = "Distill-Signature"


class WebhooksNotConfigured(ServiceUnavailable):
    code = "webhooks_not_configured"


def root_secret(settings: Settings) -> bytes:
    if settings.webhook_secret:
        return settings.webhook_secret.encode()
    if settings.environment == "production":
        raise WebhooksNotConfigured("set DISTILL_WEBHOOK_SECRET (the same in every process) to sign webhooks")
    path = Path(settings.data_dir) / ROOT_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{ROOT_FILE}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
        try:  # two processes starting at once: the first file to land wins, both then read it
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip().encode()


def tenant_secret(settings: Settings, tenant_id: str) -> str:
    digest = hmac.new(root_secret(settings), f"webhook:{tenant_id}".encode(), hashlib.sha256).hexdigest()
    return f"whsec_{digest}"


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(secret: str, header: str, body: bytes, *, tolerance_s: int = 300,
           now: float | None = None) -> bool:
    """What a receiver runs: True when `header` signs `body` with `secret`, at most `tolerance_s` old."""
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        t = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - t) > tolerance_s:
        return False
    expected = sign(secret, body, t).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))
