"""The one Settings class: the only place that reads the environment (prefix `DISTILL_`).

Outside development it fails fast on placeholder secrets, so a forgotten `changeme` never reaches production.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PLACEHOLDER_SECRETS = frozenset(
    {"changeme", "change-me", "change_me", "placeholder", "secret", "password", "xxx"}
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DISTILL_", env_file=None, extra="ignore")

    environment: Literal["development", "test", "production"] = "development"
    # Embedded default: everything under ./.distill; production sets Postgres, Redis and S3 URLs.
    data_dir: Path = Path("./.distill")
    database_url: str = "sqlite:///./.distill/distill.db"
    database_pool_size: int = Field(default=10, ge=1)
    # Connections of the async pool behind the polled `GET /v1/jobs/{id}`, per API process. It pipelines
    # whatever is waiting, so one connection carries thousands of reads a second; each extra one is another
    # PostgreSQL backend competing for the CPU (bench/README.md, API: p99 1.6x hello's with 1, 2x with 2).
    database_read_pool_size: int = Field(default=1, ge=1)
    database_pre_ping: bool = False  # one extra round trip per checkout; see app.db.session.make_engine
    # A Celery transport that needs no server (SQLAlchemy over SQLite); Redis in production.
    broker_url: str = "sqla+sqlite:///./.distill/broker.sqlite"
    broker_folder: Path = Path("./.distill/broker")

    storage_backend: Literal["local", "s3"] = "local"
    storage_path: Path = Path("./.distill/objects")
    s3_bucket: str = "distill"
    s3_endpoint_url: str | None = None  # MinIO: http://minio:9000
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    # Artifact downloads answer 307 to a short-lived presigned GET instead of proxying the bytes.
    s3_presign_downloads: bool = False
    # Workers keep retrying an unreachable store this long (backoff up to 15 s) before an upload counts as
    # failed: a store down for a minute must not cost a job. The API keeps botocore's few quick retries and
    # answers 503, since a client waiting on it is better told at once.
    s3_worker_retry_budget_s: float = Field(default=120.0, ge=0)
    presign_expires_s: int = Field(default=300, ge=1, le=3600)

    max_upload_bytes: int = Field(default=2 * 1024**3, ge=1)
    # A dataset registered from an `s3://bucket/prefix/` (a set of WebDataset .tar shards, fetched by the
    # worker shard by shard onto its disk and streamed from there): at most this many shards and bytes.
    max_registered_shards: int = Field(default=100_000, ge=1)
    max_registered_bytes: int = Field(default=2 * 1024**4, ge=1)
    upload_chunk_bytes: int = Field(default=1024 * 1024, ge=1024)
    # Authenticated keys are remembered this long per process; a revoked key stops working within it.
    key_cache_ttl_s: float = Field(default=30.0, ge=0)
    worker_lease_s: int = Field(default=120, ge=5)
    # How long a stage that finished while PostgreSQL was away waits for it before its attempt is retried.
    worker_db_wait_s: float = Field(default=120.0, ge=0)
    max_attempts: int = Field(default=3, ge=1)
    # The reaper (worker/reaper.py): how often each worker looks for expired leases, and how long a queued
    # or released job may sit untouched before its message counts as lost and is sent again.
    reaper_interval_s: float = Field(default=15.0, gt=0)
    reaper_stale_after_s: float = Field(default=300.0, gt=0)
    # How often a running stage pushes its work folder (soft-label shards) to the store between epochs.
    mirror_interval_s: float = Field(default=30.0, gt=0)
    # A job's soft-label stage over more rows than this (token windows for a causal LM) is split into shard
    # tasks of about this many rows each (whole shards of the job's `shard_size`, or `shard_rows` windows),
    # which any workers of the `soft_label` queue label side by side (worker/tasks/shards.py). 0: one task
    # labels the whole dataset.
    soft_label_task_rows: int = Field(default=0, ge=0)
    # Per tenant (app.limits): jobs queued or running at once, and of those, waiting for a worker.
    max_active_jobs_per_tenant: int = Field(default=20, ge=1)
    max_queued_jobs_per_tenant: int = Field(default=10, ge=1)
    readiness_timeout_s: float = Field(default=2.0, gt=0)
    # /metrics: with a token, a scraper must send `Authorization: Bearer <token>`. Without one it is open,
    # except in production, where it answers 404 unless `metrics_public` says the port is private anyway.
    metrics_token: str | None = None
    metrics_public: bool = False
    # Webhooks: per-tenant signing secrets derive from this root (development: a random file in data_dir).
    webhook_secret: str | None = None
    webhook_max_attempts: int = Field(default=5, ge=1, le=20)
    webhook_backoff_s: float = Field(default=1.0, ge=0)  # doubles after each failed attempt
    webhook_timeout_s: float = Field(default=5.0, gt=0)
    webhook_allow_private: bool = False  # outside development: allow receivers on loopback/private addresses
    # Stage children run user models inside bubblewrap (worker/sandbox.py). "off" runs them unconfined:
    # only for one trusted user on a machine without user namespaces, never with more than one tenant.
    sandbox: Literal["bwrap", "off"] = "bwrap"
    bwrap_path: str = "bwrap"
    # Processes a classification job's distill stage trains on, data-parallel inside its stage child
    # (worker/distill/data_parallel.py): one per GPU (at most as many as the worker sees), or CPU processes
    # over gloo. `distill worker --procs N` sets it. 1: one process, nothing spawned.
    worker_procs: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _refuse_placeholder_secrets(self) -> Settings:
        if self.environment == "development":
            return self
        secrets = {
            "DISTILL_S3_SECRET_ACCESS_KEY": self.s3_secret_access_key,
            "DISTILL_WEBHOOK_SECRET": self.webhook_secret,
            "DISTILL_METRICS_TOKEN": self.metrics_token,
            "DISTILL_DATABASE_URL password": urlsplit(self.database_url).password,
            "DISTILL_BROKER_URL password": urlsplit(self.broker_url).password,
        }
        bad = [
            name
            for name, value in secrets.items()
            if value is not None and value.lower() in PLACEHOLDER_SECRETS
        ]
        if bad:
            raise ValueError(f"placeholder secret in {', '.join(bad)} outside development; set a real one")
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


@lru_cache
def get_settings() -> Settings:
    return Settings()
