"""An API server that accepts connections but never answers must not hang the operator."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import urllib3
from kubernetes import client

from finetune_operator import kube


@pytest.fixture
def silent_server() -> Iterator[str]:
    """Accepts TCP connections and reads requests, answering none."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()
    for conn in held:
        conn.close()


@pytest.mark.parametrize("api_client", [kube.TimeoutApiClient, client.ApiClient])
def test_every_call_has_a_deadline(
    silent_server: str, monkeypatch: pytest.MonkeyPatch, api_client: type[client.ApiClient]
) -> None:
    monkeypatch.setattr(kube, "REQUEST_TIMEOUT_S", 0.5)
    configuration = client.Configuration(host=silent_server)
    configuration.retries = False
    k = kube.Kube(api_client(configuration))
    done = threading.Event()

    def call() -> None:
        try:
            k.read_job("ns", "bot")
        except urllib3.exceptions.HTTPError:
            done.set()

    started = time.monotonic()
    threading.Thread(target=call, daemon=True).start()
    finished = done.wait(5)
    if api_client is client.ApiClient:
        assert not finished, "premise: without a deadline the call hangs"
        return
    assert finished and time.monotonic() - started < 3, "the call was not given up"
