# syntax=docker/dockerfile:1.7
# Two images from one file:
#   docker build --target api    -t distill-api .     API + migrations, no torch (small, starts fast)
#   docker build --target worker -t distill-worker .  Celery worker with CUDA torch (one per GPU)
# Both run as an unprivileged user; state lives in /var/lib/distill (a volume) and in Postgres/S3.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    DISTILL_DATA_DIR=/var/lib/distill
RUN groupadd --system --gid 10001 distill \
 && useradd --system --uid 10001 --gid distill --home-dir /var/lib/distill --shell /usr/sbin/nologin distill \
 && mkdir -p /var/lib/distill /srv/distill \
 && chown distill:distill /var/lib/distill
WORKDIR /srv/distill

# The package is installed editable from /srv/distill, and the final stages copy the sources to that same
# path: the migrations (alembic.ini, migrations/) are found next to the code, as in a checkout.
FROM base AS api-build
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY app ./app
COPY worker ./worker
RUN pip install -e .

FROM base AS worker-build
RUN python -m venv /opt/venv
# PyPI's Linux x86_64 torch wheels are CUDA builds (CUDA libraries come as pip packages; the host driver is
# mounted by the NVIDIA container toolkit). Pin the version the project is tested with.
ARG TORCH_VERSION=2.13.0
# pip's own default index needs no URL; pass --build-arg TORCH_INDEX_URL=... for a mirror or a CPU index.
ARG TORCH_INDEX_URL=
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY app ./app
COPY worker ./worker
RUN pip install -e ".[worker]"

FROM base AS api
COPY --from=api-build /opt/venv /opt/venv
COPY pyproject.toml alembic.ini ./
COPY migrations ./migrations
COPY app ./app
COPY worker ./worker
USER distill
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["distill", "serve", "--api-only", "--no-migrate", "--host", "0.0.0.0", "--port", "8000", "--workers", "2"]

FROM base AS worker
# bubblewrap: every stage child (a user's model) runs in it (worker/sandbox.py); the worker refuses to start
# without it. It needs user namespaces in the container: see docker-compose.yml's worker service.
RUN apt-get update \
 && apt-get install -y --no-install-recommends bubblewrap \
 && rm -rf /var/lib/apt/lists/*
COPY --from=worker-build /opt/venv /opt/venv
COPY pyproject.toml alembic.ini ./
COPY migrations ./migrations
COPY app ./app
COPY worker ./worker
USER distill
# One worker process per GPU; scale the service (or run one container per device) for more GPUs.
CMD ["distill", "worker", "--queues", "soft_label,distill"]
