"""A ropekvd started for a client benchmark, with a Llama-3-8B-shaped model (8 KV heads,
head_dim 128, bf16, 16-token blocks, Llama-3's RoPE theta) registered as "m"."""

import contextlib
import shutil
import subprocess
import tempfile
import time

import ropekv


@contextlib.contextmanager
def llama_daemon(binary, port, layers, host_capacity, daemon_flags):
    """Starts `binary` on 127.0.0.1:port (a fresh data folder, disk tier off, --host_capacity,
    then daemon_flags), registers the model with `layers` layers once the daemon answers, and
    yields a connected ropekv.Client; stops the daemon and removes the folder after."""
    data = tempfile.mkdtemp(prefix="ropekv_bench_")
    daemon = subprocess.Popen(
        [binary, f"--listen=127.0.0.1:{port}", f"--data_dir={data}",
         f"--host_capacity={host_capacity}", "--disk_enabled=false"] + list(daemon_flags),
        stdout=subprocess.DEVNULL)  # its log to our stderr: an unread pipe could stall it
    try:
        client = ropekv.Client(f"127.0.0.1:{port}")
        for _ in range(100):  # until the daemon answers
            try:
                client.register_model(name="m", layers=layers, kv_heads=8, head_dim=128,
                                      dtype="bfloat16", block_tokens=16,
                                      rope={"type": "default", "theta": 500000.0})
                break
            except ropekv.Error:
                time.sleep(0.1)
        yield client
    finally:
        daemon.terminate()
        daemon.wait()
        shutil.rmtree(data, ignore_errors=True)
