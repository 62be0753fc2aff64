"""A local ropekvd for scripts, examples and tests: a fresh data folder, a free port.

    with ropekv.LocalDaemon("build/ropekvd", "--host_capacity", "1GiB") as d:
        client = ropekv.Client(d.address)

The daemon listens on 127.0.0.1:0 unless the flags name another --listen, reports its port
through --port_file, and logs to <folder>/log. Stopping it (SIGTERM, then SIGKILL after
`stop_timeout`) removes the folder.
"""

import os
import shutil
import subprocess
import tempfile
import time

from ropekv.errors import Error

import grpc


class LocalDaemon:
    """A ropekvd child process. `flags` are extra command-line flags (strings)."""

    def __init__(self, binary, *flags, timeout=60.0, stop_timeout=30.0, prefix="ropekv-"):
        self.folder = tempfile.mkdtemp(prefix=prefix)
        self.stop_timeout = stop_timeout
        port_file = os.path.join(self.folder, "port")
        self.log_path = os.path.join(self.folder, "log")
        args = [binary, "--data_dir", os.path.join(self.folder, "data"), "--port_file", port_file]
        if not any(f == "--listen" or f.startswith("--listen=") for f in flags):
            args += ["--listen", "127.0.0.1:0"]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(args + [str(f) for f in flags], stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not (os.path.exists(port_file) and self._read(port_file).strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                why = (f"exited with {self.proc.returncode}" if self.proc.poll() is not None
                       else f"wrote no port within {timeout:g} s")
                self.stop()
                raise Error(grpc.StatusCode.UNAVAILABLE, f"ropekvd {why}: {self.log()}")
            time.sleep(0.05)
        self.address = "127.0.0.1:" + self._read(port_file).strip()

    @staticmethod
    def _read(path):
        with open(path) as f:
            return f.read()

    def log(self):
        """What the daemon printed so far."""
        try:
            return self._read(self.log_path)
        except OSError:
            return ""

    def stop(self):
        """Stops the daemon and removes its folder (idempotent)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
