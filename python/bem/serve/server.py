"""Running the `bem serve` app with uvicorn: in the foreground with a graceful shutdown (the first
SIGTERM or SIGINT stops new requests — they get 503 — and lets the in-flight ones finish before
uvicorn exits; a second signal forces the exit), or in a background thread on a free port (tests,
benchmarks, notebooks)."""
from __future__ import annotations

import logging
import threading
import time

import uvicorn
from fastapi import FastAPI

log = logging.getLogger("bem")


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose exit signal drains the app's generation worker first."""

    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self._state = app.state.bem
        self._draining = False

    def handle_exit(self, sig: int, frame) -> None:
        if self._draining:            # second signal: stop now
            self.should_exit = self.force_exit = True
            return
        self._draining = True
        state = self._state
        log.info("bem serve: signal %d: finishing %d in-flight requests (at most %.0f s), "
                 "answering 503 to new ones", sig, state.worker.outstanding, state.drain_timeout)
        state.begin_drain()
        threading.Thread(target=self._exit_when_drained, name="bem-serve-drain",
                         daemon=True).start()

    def _exit_when_drained(self) -> None:
        if not self._state.worker.drain(self._state.drain_timeout):
            log.warning("bem serve: %d requests still running after %.0f s; exiting anyway",
                        self._state.worker.outstanding, self._state.drain_timeout)
        self.should_exit = True


def _config(app: FastAPI, host: str, port: int, log_level: str) -> uvicorn.Config:
    if not hasattr(app.state, "bem"):
        raise TypeError("app: expected an app made by bem.serve.create_app")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port: expected an int in [0, 65535], got {port!r}")
    # uvicorn's own graceful timeout covers responses still being written after the drain.
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                          timeout_graceful_shutdown=int(app.state.bem.drain_timeout) + 5,
                          lifespan="on")


def run_server(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000,
               log_level: str = "info") -> None:
    """Serve `app` (bem.serve.create_app) until SIGTERM/SIGINT, then drain and return."""
    DrainingServer(_config(app, host, port, log_level), app).run()


class ServerThread:
    """`app` served by uvicorn in a daemon thread on `host`:`port` (0: a free port).

    >>> with ServerThread(create_app(model)) as server:
    ...     requests.get(server.url + "/health")

    start() returns once the server accepts connections; stop() drains and joins."""

    def __init__(self, app: FastAPI, *, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning", start_timeout: float = 60.0):
        self.server = DrainingServer(_config(app, host, port, log_level), app)
        self.host, self.start_timeout = host, start_timeout
        self.port: int | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServerThread:
        self._thread = threading.Thread(target=self.server.run, name="bem-serve-http",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("bem serve: the server thread exited during start-up (see the "
                                   "log)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"bem serve: not started after {self.start_timeout} s")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def drain(self) -> None:
        """As SIGTERM does: refuse new requests (503), exit once the in-flight ones finished."""
        self.server.handle_exit(15, None)

    def stop(self, timeout: float = 60.0) -> None:
        if self._thread is None:
            return
        self.server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"bem serve: the server thread did not stop in {timeout} s")
        self._thread = None

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
