"""The baseline for `bench.api`: the smallest FastAPI app, served by the same uvicorn settings as the API.

    uvicorn bench.api_hello:app --workers 2

A plain async route returning a small dict: the floor of what one request costs in this server and
framework, against which `GET /v1/jobs/{id}` (auth, one query, a larger JSON body, middleware) is compared.
"""

from __future__ import annotations

from fastapi import FastAPI

app = FastAPI()


@app.get("/hello")
async def hello() -> dict[str, str]:
    return {"message": "hello, world"}


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}
