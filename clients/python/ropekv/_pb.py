"""Access to the generated protobuf / gRPC modules (generated at build time into
<build>/python/ropekv/v1/ from proto/ropekv/v1/*.proto)."""

import importlib
import pkgutil

try:
    from ropekv.v1 import kvcache_pb2 as pb  # noqa: F401
    from ropekv.v1 import kvcache_pb2_grpc as pb_grpc  # noqa: F401
except ImportError as e:  # pragma: no cover - a setup error, said plainly
    raise ImportError(
        "ropekv: the generated modules ropekv.v1.kvcache_pb2 / kvcache_pb2_grpc were not found "
        f"({e}). Build the `ropekv_python` target (cmake --build BUILD --target ropekv_python) "
        "and put BUILD/python on PYTHONPATH."
    ) from e


def grpc_modules():
    """Every generated *_pb2_grpc module of the ropekv.v1 package (one per .proto with a
    service), imported. New services (sessions, ...) appear here without client changes."""
    import ropekv.v1 as v1

    mods = []
    for info in pkgutil.iter_modules(v1.__path__):
        if info.name.endswith("_pb2_grpc"):
            mods.append(importlib.import_module(f"ropekv.v1.{info.name}"))
    return mods


def has_field(message_cls, name):
    """Whether the generated message has a field (lets the client work across proto revisions)."""
    return name in message_cls.DESCRIPTOR.fields_by_name
