"""Helpers of the serve tests (imported by name: a test module must not import from ``conftest``)."""

from __future__ import annotations

import threading
import time


class RunningServer:
    """uvicorn serving ``create_app`` in a thread on 127.0.0.1:0; ``stop()`` drains and joins."""

    def __init__(self, model, config, key=None, wait_ready=True):
        from transfer.serve.app import create_app
        from transfer.serve.server import listen_socket, make_server, url_of

        self.app = create_app(model, config, key=key)
        self.state = self.app.state.transfer
        self.sock = listen_socket("127.0.0.1", 0)
        self.url = url_of(self.sock)
        self.server = make_server(self.app, config, self.state.drain)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        self._wait(lambda: self.server.started, "start")
        if wait_ready:
            self._wait(lambda: self.state.ready, "warm up")

    @staticmethod
    def _wait(cond, what, timeout=30.0):
        t = time.time() + timeout
        while not cond():
            if time.time() > t:
                raise TimeoutError(f"server did not {what} within {timeout} s")
            time.sleep(0.01)

    def stop(self):
        self.state.drain()
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
        assert not self.thread.is_alive(), "server thread did not stop"
