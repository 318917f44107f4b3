"""`distill admin`: operator commands that talk to the database directly (no API key needed)."""

from __future__ import annotations

from typing import Annotated

import typer

admin = typer.Typer(no_args_is_help=True, help="Operator commands: API keys and tenants.")


def _database():  # returns a Database; imported lazily
    from app.config import get_settings
    from app.db import Database

    settings = get_settings()
    if settings.is_sqlite:
        # The embedded default may not have been served yet: make sure its tables exist.
        from worker.commands.serve import migrate

        migrate()
    return Database.from_settings(settings)


@admin.command("create-key")
def create_key(tenant: Annotated[str, typer.Option(help="tenant name; created when new")]) -> None:
    """Print a new API key for TENANT. It is shown once: only its hash is stored."""
    from app.db import session_scope
    from app.tenants import service as tenants

    db = _database()
    try:
        with session_scope(db) as session:
            key = tenants.create_key(session, tenant)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--tenant") from None
    finally:
        db.dispose()
    typer.echo(key)


@admin.command("revoke-key")
def revoke_key(key: Annotated[str, typer.Argument(help="the key to revoke")]) -> None:
    """Revoke KEY; requests with it fail once API processes' key caches expire (seconds)."""
    from app.db import session_scope
    from app.tenants import service as tenants

    db = _database()
    try:
        with session_scope(db) as session:
            revoked = tenants.revoke_key(session, key)
    finally:
        db.dispose()
    if not revoked:
        typer.echo("error: no such active key", err=True)
        raise typer.Exit(1)
    typer.echo("revoked")


def register(app: typer.Typer) -> None:
    app.add_typer(admin, name="admin")
