"""An HTTP file server for the download tests: what the CIFAR and Zenodo hosts do (Range requests),
with each request's Range recorded. Its own module, so that the tests and conftest's ``served``
fixture share one class (conftest is imported twice: as ``conftest`` and as ``tests.conftest``)."""

from __future__ import annotations

import http.server
from pathlib import Path


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with HTTP Range support, like the CIFAR host, and records each request's Range."""

    requests: list[str] = []
    honour_range = True

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        rng = self.headers.get("Range")
        type(self).requests.append(rng or "full")
        if rng and type(self).honour_range:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_error(416)
                return
            body = data[start:]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
