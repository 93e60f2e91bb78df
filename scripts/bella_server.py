"""`bella-vqa serve --port 0 ...` as a child process, for the scripts that talk to it
(openai_check.py, serve_load.py). Standard library only."""

import json
import os
import re
import subprocess
import threading
import time
import urllib.request


class Server:
    """Starts the server on an ephemeral loopback port and waits for /health; its output is kept
    (`log`) for failure reports. The API key is given (or not) on the command line, never through
    the environment."""

    def __init__(self, binary, extra_args, start_timeout: float):
        self.log = []
        self.proc = subprocess.Popen(
            [binary, "serve", "--port", "0", *extra_args],
            stdin=subprocess.DEVNULL,
            env={k: v for k, v in os.environ.items() if k != "BELLA_API_KEY"},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.base = None
        self.health = None
        found = threading.Event()

        def pump():
            for line in self.proc.stdout:
                self.log.append(line.rstrip("\n"))
                m = re.search(r"listening on (http://\S+)", line)
                if m and not found.is_set():
                    self.base = m.group(1).rstrip("/")
                    found.set()
            found.set()  # exited

        threading.Thread(target=pump, daemon=True).start()
        if not found.wait(start_timeout) or self.base is None:
            self.stop()
            raise RuntimeError("the server printed no 'listening on' line:\n" + "\n".join(self.log[-30:]))
        if not self.base.startswith(("http://127.", "http://[::1]", "http://localhost")):
            self.stop()
            raise RuntimeError(f"the server is not on loopback: {self.base}")
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=5) as r:
                    if r.status == 200:
                        self.health = json.load(r)
                        return
            except Exception:  # noqa: BLE001 (not up yet)
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the server did not become healthy:\n" + "\n".join(self.log[-30:]))
            time.sleep(0.1)

    def metrics(self) -> str:
        try:
            with urllib.request.urlopen(self.base + "/metrics", timeout=5) as r:
                return r.read().decode()
        except Exception as e:  # noqa: BLE001
            return f"# /metrics failed: {e}"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
