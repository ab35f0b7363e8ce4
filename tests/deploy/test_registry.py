"""deploy/registry/registry.py: the registry it runs answers the Confluent-compatible API, and
its lifecycle (start, reuse, status, stop) is sound. It drives a registry in a throwaway cache
dir that shares the fetched app, so the session's registry is never disturbed."""

import os
from pathlib import Path

import httpx
import pytest

from tests.fixtures.registry import DEFAULT_REGISTRY_HOME, run_registry_cli

pytestmark = pytest.mark.registry


@pytest.fixture
def home(tmp_path: Path) -> Path:
    fetched = run_registry_cli("fetch")
    assert fetched.returncode == 0, fetched.stderr
    app = Path(os.environ.get("VOICECLONE_REGISTRY_HOME") or DEFAULT_REGISTRY_HOME) / "app"
    (tmp_path / "app").symlink_to(app.resolve(), target_is_directory=True)
    return tmp_path


def registry(home: Path, *args: str) -> tuple[int, str]:
    result = run_registry_cli("--home", str(home), *args)
    return result.returncode, result.stdout.strip()


def test_start_is_idempotent_status_tells_and_stop_stops(home: Path) -> None:
    assert registry(home, "status") == (3, "stopped")
    assert registry(home, "url")[0] == 3
    code, out = registry(home, "start", "--port", "0")
    assert code == 0
    url = out.splitlines()[-1].removeprefix("url=")
    assert url.startswith("http://127.0.0.1:")
    assert url.endswith("/apis/ccompat/v7")
    try:
        pid = (home / "registry.pid").read_text().strip()
        assert httpx.get(f"{url}/subjects").json() == []
        assert registry(home, "start") == (0, f"url={url}")  # reused, not a second JVM
        assert (home / "registry.pid").read_text().strip() == pid
        assert registry(home, "url") == (0, url)
        code, status = registry(home, "status")
        assert code == 0
        assert status == f"running pid={pid} url={url} version=2.6.13.Final"
    finally:
        assert registry(home, "stop")[0] == 0
    assert registry(home, "status") == (3, "stopped")
    assert registry(home, "stop")[0] == 0  # stopping a stopped registry is fine
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/subjects")
