"""Where the client finds the server and its key, first match wins:

1. flags (`--url`, `--api-key`); 2. environment `DISTILL_URL` / `DISTILL_API_KEY`;
3. `~/.config/distill/config.toml` (or `$DISTILL_CONFIG`), keys `url` and `api_key`;
4. the embedded default: `http://127.0.0.1:8000` and the key `distill serve` wrote to `./.distill/api_key`.

This is the client's side, which runs on a user's machine; the server reads its own settings in app/config.py.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from app.client.errors import DistillClientError

DEFAULT_URL = "http://127.0.0.1:8000"


class MissingApiKey(DistillClientError):
    code = "missing_api_key"


@dataclass(frozen=True)
class Connection:
    url: str
    api_key: str


def config_file() -> Path:
    if os.environ.get("DISTILL_CONFIG"):
        return Path(os.environ["DISTILL_CONFIG"])
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "distill" / "config.toml"


def _from_file(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise DistillClientError(f"cannot read {path}: {exc}", code="bad_config_file") from exc
    return {k: str(v) for k, v in data.items() if k in ("url", "api_key") and v}


def embedded_key_file() -> Path:
    return Path(os.environ.get("DISTILL_DATA_DIR") or ".distill") / "api_key"


def resolve(url: str | None = None, api_key: str | None = None) -> Connection:
    file_values = _from_file(config_file())
    url = url or os.environ.get("DISTILL_URL") or file_values.get("url") or DEFAULT_URL
    api_key = api_key or os.environ.get("DISTILL_API_KEY") or file_values.get("api_key")
    if not api_key and embedded_key_file().is_file():
        api_key = embedded_key_file().read_text().strip()
    if not api_key:
        raise MissingApiKey(
            "no API key: pass --api-key, set DISTILL_API_KEY, write api_key to "
            f"{config_file()}, or start `distill serve` here so {embedded_key_file()} exists"
        )
    return Connection(url=url.rstrip("/"), api_key=api_key)
