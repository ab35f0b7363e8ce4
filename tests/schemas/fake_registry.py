"""A small in-process Confluent Schema Registry, kept only for what a real one cannot be made to do.

The registry tests run against a real Apicurio Registry (tests/fixtures/registry.py). This fake
stays for two things Apicurio cannot produce on demand: answering any HTTP status asked of it
(`fail_with`: a 503 from a registry that is up, a 409 for any schema), and counting the
requests a codec makes (`count`: one round trip per subject and per id). It serves the subset of
the REST API that AsyncSchemaRegistryClient uses, over real HTTP on 127.0.0.1, so the client's
code path stays real. Like Confluent, identical schemas get one global id, and re-registering a
schema under a subject returns its existing id. It runs in its own thread, so it works from any
event loop and from synchronous code.
"""

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
Response = tuple[int, Any]

_SUBJECT_NOT_FOUND = (HTTPStatus.NOT_FOUND, {"error_code": 40401, "message": "Subject not found"})
_SCHEMA_NOT_FOUND = (HTTPStatus.NOT_FOUND, {"error_code": 40403, "message": "Schema not found"})
_VERSION_NOT_FOUND = (HTTPStatus.NOT_FOUND, {"error_code": 40402, "message": "Version not found"})


def _normalized(schema: str) -> str:
    return json.dumps(json.loads(schema), sort_keys=True, separators=(",", ":"))


@dataclass
class FakeSchemaRegistry:
    """Registry state plus the HTTP server exposing it. `requests` logs (method, path)."""

    schemas: dict[int, str] = field(default_factory=dict)  # id -> schema string
    subjects: dict[str, list[int]] = field(default_factory=dict)  # subject -> ids by version
    requests: list[tuple[str, str]] = field(default_factory=list)
    # When set, every request gets this HTTP status (to simulate an outage).
    fail_with: int | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> str:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        # A short poll interval keeps stop() (which waits for the loop) fast.
        serve = partial(self._server.serve_forever, poll_interval=0.01)
        threading.Thread(target=serve, daemon=True).start()
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def count(self, method: str, path_prefix: str) -> int:
        return sum(1 for m, p in self.requests if m == method and p.startswith(path_prefix))

    # -- the API ----------------------------------------------------------------------------

    def handle(self, method: str, path: str, body: Any) -> Response:
        with self._lock:
            self.requests.append((method, path))
            if self.fail_with is not None:
                return self.fail_with, {"error_code": self.fail_with, "message": "injected"}
            for route_method, pattern, action in _ROUTES:
                match = pattern.fullmatch(path)
                if match and route_method == method:
                    return action(self, *match.groups(), body=body)
            return HTTPStatus.NOT_FOUND, {"error_code": 404, "message": "no such endpoint"}

    def _id_for(self, schema: str) -> int:
        wanted = _normalized(schema)
        for schema_id, known in self.schemas.items():
            if _normalized(known) == wanted:
                return schema_id
        schema_id = len(self.schemas) + 1
        self.schemas[schema_id] = schema
        return schema_id

    def _register(self, subject: str, *, body: Any) -> Response:
        schema_id = self._id_for(body["schema"])
        versions = self.subjects.setdefault(subject, [])
        if schema_id not in versions:
            versions.append(schema_id)
        return HTTPStatus.OK, {"id": schema_id}

    def _check_version(self, subject: str, *, body: Any) -> Response:
        if subject not in self.subjects:
            return _SUBJECT_NOT_FOUND
        wanted = _normalized(body["schema"])
        for version, schema_id in enumerate(self.subjects[subject], start=1):
            if _normalized(self.schemas[schema_id]) == wanted:
                return HTTPStatus.OK, self._version_body(subject, version)
        return _SCHEMA_NOT_FOUND

    def _get_by_id(self, schema_id: str, *, body: Any) -> Response:
        schema = self.schemas.get(int(schema_id))
        if schema is None:
            return _SCHEMA_NOT_FOUND
        return HTTPStatus.OK, {"schema": schema}

    def _list_subjects(self, *, body: Any) -> Response:
        return HTTPStatus.OK, sorted(self.subjects)

    def _list_versions(self, subject: str, *, body: Any) -> Response:
        if subject not in self.subjects:
            return _SUBJECT_NOT_FOUND
        return HTTPStatus.OK, list(range(1, len(self.subjects[subject]) + 1))

    def _get_version(self, subject: str, version: str, *, body: Any) -> Response:
        versions = self.subjects.get(subject)
        if not versions:
            return _SUBJECT_NOT_FOUND
        number = len(versions) if version == "latest" else int(version)
        if not 1 <= number <= len(versions):
            return _VERSION_NOT_FOUND
        return HTTPStatus.OK, self._version_body(subject, number)

    def _version_body(self, subject: str, version: int) -> dict[str, Any]:
        schema_id = self.subjects[subject][version - 1]
        return {
            "subject": subject,
            "version": version,
            "id": schema_id,
            "schema": self.schemas[schema_id],
        }


_Action = Callable[..., Response]
_ROUTES: list[tuple[str, re.Pattern[str], _Action]] = [
    ("POST", re.compile(r"/subjects/([^/]+)/versions"), FakeSchemaRegistry._register),
    ("POST", re.compile(r"/subjects/([^/]+)"), FakeSchemaRegistry._check_version),
    ("GET", re.compile(r"/schemas/ids/(\d+)"), FakeSchemaRegistry._get_by_id),
    ("GET", re.compile(r"/subjects"), FakeSchemaRegistry._list_subjects),
    ("GET", re.compile(r"/subjects/([^/]+)/versions"), FakeSchemaRegistry._list_versions),
    (
        "GET",
        re.compile(r"/subjects/([^/]+)/versions/(latest|\d+)"),
        FakeSchemaRegistry._get_version,
    ),
]


def _handler_for(registry: FakeSchemaRegistry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._respond(*registry.handle("GET", self._path(), None))

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"null")
            self._respond(*registry.handle("POST", self._path(), body))

        def _path(self) -> str:
            return self.path.split("?", 1)[0].rstrip("/") or "/"

        def _respond(self, status: int, payload: Any) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep test output quiet

    return Handler
