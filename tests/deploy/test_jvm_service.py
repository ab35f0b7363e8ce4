"""deploy/jvm_service.py, the scaffolding the broker and registry scripts share: the parts that
need no JVM (the scripts' own tests drive the rest through real brokers and registries)."""

import importlib
import socket
import sys
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
if str(DEPLOY) not in sys.path:
    sys.path.insert(0, str(DEPLOY))  # as the scripts import it
jvm_service = importlib.import_module("jvm_service")


def test_a_port_held_by_a_listener_is_taken_and_choosing_it_says_so() -> None:
    with socket.socket() as listener:
        listener.bind((jvm_service.HOST, 0))
        listener.listen()
        port = listener.getsockname()[1]

        assert not jvm_service.port_is_free(port)
        with pytest.raises(jvm_service.ServiceError, match=rf"^HTTP port {port} on 127\.0\.0\.1"):
            jvm_service.choose_port(port, None, "HTTP")
        assert jvm_service.choose_port(None, port, "HTTP") != port  # preferred, but taken


def test_a_port_whose_last_connection_lingers_in_time_wait_is_free() -> None:
    """As the JVM binds (SO_REUSEADDR): a restarted service takes its port back while the last
    run's connections are still in TIME_WAIT, where a plain bind fails."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Java's listeners do
        listener.bind((jvm_service.HOST, 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection((jvm_service.HOST, port))
        accepted, _ = listener.accept()
        accepted.close()  # the side that closes first keeps the connection in TIME_WAIT
        client.close()

    with socket.socket() as plain, pytest.raises(OSError, match="Address already in use"):
        plain.bind((jvm_service.HOST, port))
    assert jvm_service.port_is_free(port)
