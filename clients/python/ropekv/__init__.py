"""ropekv: the Python client of the ropekv KV-cache daemon (ropekvd), over grpcio.

    import numpy as np, ropekv
    c = ropekv.Client("127.0.0.1:50051")
    model = c.register_model(layers=2, kv_heads=2, head_dim=64, dtype="bf16", block_tokens=16,
                             rope={"theta": 10000.0}, name="demo").model_id
    kv = np.zeros((4, 2, 2, 2, 16, 64), np.uint16)  # [blocks, layers, k|v, kv_heads, tokens, head_dim]
    c.put("demo", list(range(64)), kv)
    header, got = c.get("demo", list(range(80)))       # the longest cached prefix: 64 tokens

Errors are raised as `ropekv.Error` with `.code` (a `grpc.StatusCode`) and `.message`.
Shared memory (the data plane, docs/dataplane.md): `buf = c.create_shm(size)`, then
`c.get(..., out=buf)` returns a numpy view of what the daemon wrote into buf, no bytes through gRPC.
`ropekv.LocalDaemon(binary, *flags)` starts a local ropekvd (scripts, examples, tests).
Optional helpers: `ropekv.hf` (transformers DynamicCache <-> blocks; needs torch + transformers).

The generated protobuf modules live in the build tree (`<build>/python/ropekv/v1/`); this
package's __path__ is extended so that they are found when the source package comes first on
sys.path.
"""

import pkgutil as _pkgutil

__path__ = _pkgutil.extend_path(__path__, __name__)  # noqa: F821 (set by the import system)

from ropekv.client import Client, Error  # noqa: E402
from ropekv.spec import model_spec, spec_from_hf_config  # noqa: E402
from ropekv.arrays import numpy_dtype, kv_shape  # noqa: E402
from ropekv.shm import ShmBuffer, CudaBuffer  # noqa: E402
from ropekv.daemon import LocalDaemon  # noqa: E402

__all__ = [
    "Client",
    "Error",
    "model_spec",
    "spec_from_hf_config",
    "numpy_dtype",
    "kv_shape",
    "ShmBuffer",
    "CudaBuffer",
    "LocalDaemon",
]
__version__ = "0.1.0"
