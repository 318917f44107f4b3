"""`GET /v1/webhooks/secret`: the calling tenant's signing secret, to verify `Distill-Signature`."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI
from pydantic import BaseModel

from app.config import Settings
from app.db.session import Database
from app.deps import SettingsDep, TenantDep
from app.webhooks.dispatcher import Dispatcher, set_dispatcher
from app.webhooks.signing import HEADER, tenant_secret

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


class WebhookSecret(BaseModel):
    secret: str
    header: str = HEADER
    scheme: str = "t=<unix seconds>,v1=hex(HMAC-SHA256(secret, '<t>.' + raw body))"


@router.get("/secret")
def get_secret(tenant_id: TenantDep, settings: SettingsDep) -> WebhookSecret:
    return WebhookSecret(secret=tenant_secret(settings, tenant_id))


def install_webhooks(app: FastAPI, settings: Settings, db: Database) -> None:
    """Deliveries from this app use its settings and database; the hook itself is process-wide."""
    from app.webhooks import hooks

    hooks.install()
    set_dispatcher(Dispatcher(settings, db))
    app.include_router(router)
