"""One HTTP call with retries: backoff on connection errors and 503, problem+json turned into typed errors.

Whether a failed attempt may be repeated depends on what the server could have done with it: a refused
connection never reached it (always safe), a 503 was declined, but a connection dropped after sending may
have been acted upon, so only idempotent calls (`idempotent=True`) repeat then.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any

import httpx

from app.client.errors import ConnectionFailed, error_from_response

log = logging.getLogger("distill.client")
RETRY_STATUSES = frozenset({502, 503, 504})
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


class Transport:
    def __init__(self, http: httpx.Client, *, max_retries: int = 5, backoff_s: float = 0.5,
                 max_backoff_s: float = 10.0, sleep: Callable[[float], None] = time.sleep) -> None:
        self.http = http
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._sleep = sleep

    def delay(self, attempt: int, response: httpx.Response | None = None) -> float:
        retry_after = response.headers.get("Retry-After") if response is not None else None
        if retry_after and retry_after.isdigit():
            return min(float(retry_after), self.max_backoff_s)
        # Full jitter keeps many clients that failed together from retrying together.
        return random.uniform(0, min(self.max_backoff_s, self.backoff_s * 2**attempt))

    def request(self, method: str, path: str, *, idempotent: bool, stream: bool = False,
                build: Callable[[], dict[str, Any]] | None = None, **kwargs: Any) -> httpx.Response:
        """Sends until an answer that is not retryable; raises `ApiError` for >= 400 (unless streamed).

        `build` returns extra request arguments per attempt (an upload reopens its file each time).
        """
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            args = {**kwargs, **(build() if build else {})}
            follow = args.pop("follow_redirects", self.http.follow_redirects)
            try:
                request = self.http.build_request(method, path, **args)
                response = self.http.send(request, stream=stream, follow_redirects=follow)
            except httpx.TransportError as exc:
                last = exc
                if not (idempotent or isinstance(exc, _NOT_SENT)) or attempt == self.max_retries:
                    break
                log.info("retrying %s %s after %s", method, path, type(exc).__name__)
                self._sleep(self.delay(attempt))
                continue
            finally:
                for value in args.get("files", {}).values():
                    handle = value[1] if isinstance(value, tuple) else value
                    if hasattr(handle, "close"):
                        handle.close()
            if response.status_code in RETRY_STATUSES and attempt < self.max_retries:
                response.close()
                log.info("retrying %s %s after HTTP %s", method, path, response.status_code)
                self._sleep(self.delay(attempt, response))
                continue
            if response.status_code >= 400:
                raise_for_problem(response)
            return response
        raise ConnectionFailed(f"{method} {self.http.base_url.join(path)} failed after "
                               f"{self.max_retries + 1} attempt(s): {last!r}")


def raise_for_problem(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    response.read()
    try:
        body = response.json()
    except ValueError:
        body = None
    raise error_from_response(response.status_code, body, response.reason_phrase)
