"""ropekv.Error: every failure of the client, local or from the daemon, with a gRPC status code."""

import grpc


class Error(Exception):
    """A failed ropekv call.

    Attributes:
      code: a grpc.StatusCode, with the daemon's meaning: NOT_FOUND (unknown model, missing parent),
        INVALID_ARGUMENT (bad shape, dtype, range; also raised locally before any byte is sent),
        ALREADY_EXISTS (a name taken by another model), RESOURCE_EXHAUSTED (tier full),
        DATA_LOSS (corrupt or short bytes), UNAVAILABLE (daemon not reachable or not serving),
        OUT_OF_RANGE (a caller's buffer too small), DEADLINE_EXCEEDED (timeout).
      message: what was expected and what came.
    """

    def __init__(self, code, message):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def from_rpc(cls, err):
        """Converts a grpc.RpcError (the one place where gRPC errors are translated)."""
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        details = err.details() if hasattr(err, "details") else str(err)
        return cls(code if code is not None else grpc.StatusCode.UNKNOWN, details or "")


def grpc_code(value):
    """The grpc.StatusCode of a numeric google.rpc.Code (UNKNOWN for a number it does not know)."""
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN


def invalid(message):
    """An INVALID_ARGUMENT error raised locally (bad shape, dtype, count)."""
    return Error(grpc.StatusCode.INVALID_ARGUMENT, message)


def read_stream(stream, what):
    """(header, bytes) of a server stream whose first message carries the header and whose
    messages carry `data` (Compose, session Read, Select, Gather). DATA_LOSS when the header is
    missing; the daemon's errors as Error."""
    header, chunks = None, []
    try:
        for msg in stream:
            if header is None:
                if not msg.HasField("header"):
                    raise Error(grpc.StatusCode.DATA_LOSS, f"{what}: the first message has no header")
                header = msg.header
            chunks.append(msg.data)
    except grpc.RpcError as e:
        raise Error.from_rpc(e) from None
    if header is None:
        raise Error(grpc.StatusCode.DATA_LOSS, f"{what}: the stream ended without a header")
    return header, b"".join(chunks)
