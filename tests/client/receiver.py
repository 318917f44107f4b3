"""A webhook receiver on loopback for the tests: answers 500 to the first POSTs, then 204, and keeps all."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Receiver:
    """Answers 500 to the first `fail_first` POSTs, then 204; keeps every request it was sent."""

    def __init__(self, fail_first: int = 0) -> None:
        self.requests: list[dict[str, Any]] = []
        receiver = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                ok = len(receiver.requests) >= fail_first
                receiver.requests.append({"headers": dict(self.headers), "body": body, "ok": ok})
                self.send_response(204 if ok else 500)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/hooks/distill"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def accepted(self) -> list[dict[str, Any]]:
        return [json.loads(r["body"]) for r in self.requests if r["ok"]]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
