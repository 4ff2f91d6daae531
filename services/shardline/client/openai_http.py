"""A small client of the scheduler's OpenAI-compatible HTTP API on the standard library
(http.client): POST a JSON body and read the answer whole, or as server-sent events. For
`shardline bench --http` and tests; applications would rather use the `openai` package.

    api = HttpApi("http://127.0.0.1:8000")
    status, body = api.post("/v1/completions", {"prompt": "Hi", "max_tokens": 4})
    for event in api.stream("/v1/completions", {"prompt": [1, 2, 3], "stream": True}):
        print(event["choices"])
"""
from __future__ import annotations

import http.client
import json
import os
import urllib.parse
from typing import Iterator, Optional

from shardline.client.client import API_KEY_ENV


class HttpApiError(Exception):
    """A refusal: an HTTP status other than 200, or an error event inside a stream."""

    def __init__(self, status: int, body: dict):
        self.status = status
        self.body = body
        error = body.get("error") if isinstance(body, dict) else None
        self.message = error.get("message", "") if isinstance(error, dict) else str(body)
        super().__init__(f"HTTP {status}: {self.message}")


class HttpApi:
    """One base URL (http:// or https://); every call opens its own connection."""

    def __init__(self, base_url: str, api_key: Optional[str] = None, timeout: float = 600.0):
        """api_key: the server's public API key (default: $SHARDLINE_API_KEY), if it wants one."""
        u = urllib.parse.urlsplit(base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"expected an http:// or https:// URL, got {base_url!r}")
        self.scheme, self.host, self.port = u.scheme, u.hostname, u.port
        self.prefix = u.path.rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.timeout = timeout

    def _send(self, path: str, body: dict) -> tuple[http.client.HTTPConnection,
                                                     http.client.HTTPResponse]:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        conn = cls(self.host, self.port, timeout=self.timeout)
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        try:
            conn.request("POST", self.prefix + path, body=json.dumps(body).encode(),
                         headers=headers)
            return conn, conn.getresponse()
        except BaseException:
            conn.close()
            raise

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        """(HTTP status, parsed JSON answer) of one POST."""
        conn, resp = self._send(path, body)
        try:
            return resp.status, json.loads(resp.read() or b"{}")
        finally:
            conn.close()

    def stream(self, path: str, body: dict) -> Iterator[dict]:
        """Each `data:` event of a streamed answer, parsed, until `data: [DONE]`. A status other
        than 200, or an error event, raises HttpApiError."""
        conn, resp = self._send(path, body)
        try:
            if resp.status != 200:
                raise HttpApiError(resp.status, json.loads(resp.read() or b"{}"))
            for raw in resp:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    raise HttpApiError(int(event["error"].get("code") or 500), event)
                yield event
            raise HttpApiError(resp.status, {"error": {"message": "stream ended before [DONE]"}})
        finally:
            conn.close()
