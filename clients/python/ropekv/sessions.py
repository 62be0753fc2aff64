"""ropekv.sessions: editor sessions (PIE) of ropekvd — the KV cache of a live document that the
daemon keeps, edits and re-rotates (docs/sessions.md).

    import ropekv
    c = ropekv.Client("127.0.0.1:50051")
    s = c.sessions
    opened = s.open("llama", file_tokens, kv)           # kv: [layers, 2, kv_heads, n, head_dim]
    ed = s.edit(opened.id, [s.replace(120, 131, line_tokens), s.insert(900, more)])
    for start, end in ed.fill:                          # the new tokens' KV, computed by the model
        s.fill(opened.id, start, end, encode(start, end))
    kv = s.read(opened.id)                              # every key at its position, rotated once

With the frontend's KV in one CUDA tensor buf [layers, 2, kv_heads, capacity, head_dim] registered
by `shared = c.register_cuda(buf)`, the daemon copies straight between buf and the session:
    sid = s.open_from_buffer("llama", tokens, shared, capacity=C).id
    s.edit(sid, [s.replace(at, at + 10, new16)])
    s.read_to_buffer(sid, shared, start=at + 16, end=n, capacity=C, token_offset=at + 16)
    ...                                                  # encode the 16 new tokens into buf
    s.fill_from_buffer(sid, shared, start=at, end=at + 16, capacity=C, token_offset=at)
For a GPU session (the daemon's default when it has a GPU) and a buffer on its device,
read_to_buffer is one fused shift + re-rotate pass on the GPU, device to device.

Arrays in and out: numpy (bf16 as uint16 bits or ml_dtypes.bfloat16) or torch tensors of any
device. Layouts: `kv` of open() is [layers, 2, kv_heads, n, head_dim] (range layout; a 6-D
[blocks, layers, 2, kv_heads, block_tokens, head_dim] block-layout array is taken as well), fill()
takes and read() returns range layout. Every failure raises ropekv.Error (NOT_FOUND: unknown
session or model; INVALID_ARGUMENT: bad ops, ranges, layouts, sizes; FAILED_PRECONDITION: tokens
awaiting fill, edited meanwhile).
"""

import dataclasses

import grpc
import numpy as np

from ropekv import arrays
from ropekv import shm as _shm
from ropekv.errors import Error, invalid, read_stream

try:
    from ropekv.v1 import session_pb2 as spb
    from ropekv.v1 import session_pb2_grpc as spb_grpc
except ImportError:  # pragma: no cover - a build without the Sessions proto
    spb = spb_grpc = None


@dataclasses.dataclass
class SessionState:
    """A session after Open, Fill or Snapshot.

    id: the session id. length: tokens of the document. version: Edits that changed it so far.
    fill: [(start, end), ...] ranges whose KV must still be computed (fill / fill_from_buffer).
    device: the CUDA device holding the session's KV in the daemon, -1 for host memory (known
      after open_from_buffer; None otherwise).
    bytes_read: bytes the daemon read from a buffer (the *_from_buffer calls), else 0.
    """

    id: str
    length: int
    version: int
    fill: list
    device: object = None
    bytes_read: int = 0


@dataclasses.dataclass
class EditResult:
    """The answer of edit(): the new length and version, the inserted ranges, the repair ranges,
    and `fill`, every range to compute now ([(start, end), ...], sorted and merged)."""

    length: int
    version: int
    inserted: list
    repair: list
    fill: list


def _ranges(rs):
    return [(int(r.start), int(r.end)) for r in rs]


def insert(at, tokens):
    """Edit op: `tokens` go before index `at` (coordinates before the edit)."""
    return spb.EditOp(insert=spb.InsertOp(at=int(at), tokens=arrays.tokens_list(tokens)))


def delete(start, end):
    """Edit op: tokens [start, end) go."""
    return spb.EditOp(**{"delete": spb.DeleteOp(start=int(start), end=int(end))})


def replace(start, end, tokens):
    """Edit op: tokens [start, end) become `tokens`."""
    return spb.EditOp(replace=spb.ReplaceOp(start=int(start), end=int(end),
                                            tokens=arrays.tokens_list(tokens)))


def _op(op):
    """An EditOp from an EditOp proto or a tuple ("insert", at, tokens) / ("delete", start, end) /
    ("replace", start, end, tokens)."""
    if spb is not None and isinstance(op, spb.EditOp):
        return op
    if isinstance(op, (tuple, list)) and op:
        kind = op[0]
        if kind == "insert" and len(op) == 3:
            return insert(op[1], op[2])
        if kind == "delete" and len(op) == 3:
            return delete(op[1], op[2])
        if kind == "replace" and len(op) == 4:
            return replace(op[1], op[2], op[3])
    raise invalid(f"an edit op is insert(at, tokens), delete(start, end) or replace(start, end, "
                  f"tokens) (or such a tuple), got {op!r}")


def _range_layout_bytes(kv, spec, n):
    """Flat uint8 bytes of KV in range layout [layers, 2, kv_heads, n, head_dim], checked."""
    want = (spec.layers, 2, spec.kv_heads, n, spec.head_dim)
    if arrays.is_torch_tensor(kv):
        kv = arrays.torch_to_numpy(kv)
    if isinstance(kv, np.ndarray):
        if not arrays._accepts(kv.dtype, spec.dtype):
            raise invalid(f"KV of this model must be of its dtype ({spec.dtype}), got {kv.dtype}")
        if tuple(kv.shape) != want:
            raise invalid(f"KV must be [layers, 2, kv_heads, n, head_dim] = {list(want)}, "
                          f"got {list(kv.shape)}")
        return np.ascontiguousarray(kv).reshape(-1).view(np.uint8)
    view = np.frombuffer(kv, dtype=np.uint8)
    need = int(np.prod(want)) * arrays.numpy_dtype(spec.dtype).itemsize
    if view.size != need:
        raise invalid(f"KV of {n} tokens is {need} bytes, got {view.size}")
    return view


def _block_layout_bytes(kv, spec, n):
    """Block-layout bytes (ceil(n / block_tokens) blocks, the last padded) of open()'s KV."""
    bt = spec.block_tokens
    blocks = -(-n // bt)
    nd = kv.ndim if isinstance(kv, np.ndarray) or arrays.is_torch_tensor(kv) else 0
    if nd == 6:
        data, got = arrays.kv_bytes(kv, spec)
        if got != blocks:
            raise invalid(f"{n} tokens need {blocks} blocks of {bt}, got {got}")
        return data
    flat = _range_layout_bytes(kv, spec, n)
    if n == 0:
        return flat
    item = arrays.numpy_dtype(spec.dtype).itemsize
    r = flat.view(np.uint8).reshape(spec.layers, 2, spec.kv_heads, n, spec.head_dim * item)
    padded = np.zeros((spec.layers, 2, spec.kv_heads, blocks * bt, spec.head_dim * item), np.uint8)
    padded[:, :, :, :n] = r
    b = padded.reshape(spec.layers, 2, spec.kv_heads, blocks, bt, spec.head_dim * item)
    return np.ascontiguousarray(b.transpose(3, 0, 1, 2, 4, 5)).reshape(-1)


def _layout(capacity, token_offset):
    if capacity is None:
        if token_offset:
            raise invalid("token_offset needs capacity= (the buffer's tokens per row)")
        return None
    if int(capacity) <= 0 or int(token_offset) < 0:
        raise invalid(f"capacity must be > 0 and token_offset >= 0, got {capacity}, "
                      f"{token_offset}")
    return _shm.dpb.TokenLayout(capacity=int(capacity), token_offset=int(token_offset))


class Sessions:
    """The Sessions service of ropekvd and the session calls of its DataPlane, on a Client's
    channel (use `client.sessions`)."""

    insert = staticmethod(insert)
    delete = staticmethod(delete)
    replace = staticmethod(replace)

    def __init__(self, client):
        if spb is None:
            raise Error(grpc.StatusCode.UNIMPLEMENTED,
                        "the generated ropekv.v1.session_pb2 module is missing (rebuild "
                        "ropekv_python)")
        self._client = client
        self._stub = spb_grpc.SessionsStub(client.channel)
        self._models = {}  # session id -> model (for the spec of read / fill)

    # -- helpers --------------------------------------------------------------------------------

    def _call(self, fn, request):
        return self._client._call(fn, request)

    def _stream(self, fn, first, data):
        chunk = self._client.chunk_bytes

        def requests():
            first.data = data[:chunk].tobytes()
            yield first
            for off in range(chunk, data.size, chunk):
                yield type(first)(data=data[off:off + chunk].tobytes())

        try:
            return fn(requests(), timeout=self._client.timeout)
        except grpc.RpcError as e:
            raise Error.from_rpc(e) from None

    def _spec_of_session(self, session_id):
        model = self._models.get(session_id)
        if model is None:
            model = self.info(session_id).model_id
            self._models[session_id] = model
        return self._client.spec(model)

    @staticmethod
    def _header(model, tokens, base_position, rotated_at, rope_table):
        h = spb.OpenSessionHeader(model=model, tokens=arrays.tokens_list(tokens),
                                  base_position=int(base_position), rope_table=int(rope_table))
        if rotated_at is not None:
            h.rotated_at = int(rotated_at)
        return h

    @staticmethod
    def _fill_header(session_id, start, end, rotated_at, rope_table, version):
        h = spb.FillHeader(session_id=session_id,
                           range=spb.TokenRange(start=int(start), end=int(end)))
        if rotated_at is not None:
            h.rotated_at = int(rotated_at)
        if rope_table is not None:
            h.rope_table = int(rope_table)
        if version is not None:
            h.version = int(version)
        return h

    @staticmethod
    def _buffer(buffer):
        if not _shm.is_buffer(buffer) or buffer._client is None:
            raise invalid("the buffer must be a registered ShmBuffer / CudaBuffer "
                          "(client.create_shm, client.register_shm, client.register_cuda)")
        if isinstance(buffer, _shm.CudaBuffer):
            buffer.synchronize()  # the frontend's writes are done before the daemon reads
        return buffer

    # -- the Sessions service -------------------------------------------------------------------

    def open(self, model, tokens, kv=None, *, base_position=0, rotated_at=None, rope_table=0,
             from_cache=False, tenant=""):
        """Opens a session over `tokens` with their KV `kv` ([layers, 2, kv_heads, n, head_dim],
        or block layout), keys rotated at rotated_at + t (default base_position + t). With
        from_cache=True (no kv): the longest cached prefix of `tokens` (Put blocks of `tenant`);
        the rest is listed in .fill. Returns a SessionState."""
        tokens = arrays.tokens_list(tokens)
        h = self._header(model, tokens, base_position, rotated_at, rope_table)
        if from_cache:
            if kv is not None:
                raise invalid("open(from_cache=True) takes no kv")
            h.from_cache, h.tenant = True, tenant
            data = np.zeros(0, np.uint8)
        else:
            if kv is None:
                raise invalid("open() needs the document's kv (or from_cache=True)")
            data = _block_layout_bytes(kv, self._client.spec(model), len(tokens))
        r = self._stream(self._stub.OpenSession, spb.OpenSessionRequest(header=h), data)
        self._models[r.session_id] = model
        return SessionState(r.session_id, r.length, r.version, _ranges(r.fill))

    def edit(self, session_id, ops, stale=(), repair_tokens=0):
        """Applies `ops` (insert / delete / replace, coordinates before the call, sorted, not
        overlapping) left to right with cumulative Δ. stale: ranges (after the edit) to compute
        again. Returns an EditResult; INVALID_ARGUMENT leaves the session unchanged."""
        req = spb.EditRequest(session_id=session_id, ops=[_op(o) for o in ops],
                              repair_tokens=int(repair_tokens))
        for a, b in stale:
            req.stale.add(start=int(a), end=int(b))
        r = self._call(self._stub.Edit, req)
        return EditResult(r.length, r.version, _ranges(r.inserted), _ranges(r.repair),
                          _ranges(r.fill))

    def fill(self, session_id, start, end, kv, *, rotated_at=None, rope_table=None,
             version=None):
        """Stores the KV of tokens [start, end) ([layers, 2, kv_heads, end - start, head_dim]);
        keys rotated at their positions unless rotated_at says where start's was. version: the
        session version the range refers to (FAILED_PRECONDITION when edited since). Returns a
        SessionState (.fill: what still awaits)."""
        spec = self._spec_of_session(session_id)
        data = _range_layout_bytes(kv, spec, int(end) - int(start))
        h = self._fill_header(session_id, start, end, rotated_at, rope_table, version)
        r = self._stream(self._stub.Fill, spb.FillRequest(header=h), data)
        return SessionState(session_id, r.length, r.version, _ranges(r.fill))

    def read(self, session_id, start=None, end=None, *, rope_table=None, device=None):
        """The KV of [start, end) (default: the document), every key at its position, rotated once
        from its stored copy: numpy [layers, 2, kv_heads, n, head_dim], or a torch tensor on
        `device` when given ("cpu", "cuda", ...)."""
        spec = self._spec_of_session(session_id)
        req = spb.ReadRequest(session_id=session_id)
        if start is not None or end is not None:
            info = None if (start is not None and end is not None) else self.info(session_id)
            a = 0 if start is None else int(start)
            b = info.length if end is None else int(end)
            req.range.start, req.range.end = a, b
        if rope_table is not None:
            req.rope_table = int(rope_table)
        header, data = read_stream(self._stub.Read(req, timeout=self._client.timeout), "Read")
        n = header.range.end - header.range.start
        dt = arrays.numpy_dtype(spec.dtype)
        shape = (spec.layers, 2, spec.kv_heads, n, spec.head_dim)
        if len(data) != int(np.prod(shape)) * dt.itemsize:
            raise Error(grpc.StatusCode.DATA_LOSS, f"Read: want {np.prod(shape) * dt.itemsize} "
                        f"bytes, got {len(data)}")
        out = np.frombuffer(data, dt).reshape(shape)
        if device is not None:
            return arrays.numpy_to_torch(out, spec.dtype, device)
        return out

    def snapshot(self, session_id):
        """A new session equal to this one now (KV shared, nothing copied): a SessionState."""
        r = self._call(self._stub.Snapshot, spb.SnapshotRequest(session_id=session_id))
        if session_id in self._models:
            self._models[r.session_id] = self._models[session_id]
        return SessionState(r.session_id, r.length, r.version, [])

    def info(self, session_id):
        """SessionInfoResponse: model_id, tokens, length, base_position, version, fill, pieces,
        stored_bytes."""
        return self._call(self._stub.Info, spb.SessionInfoRequest(session_id=session_id))

    def close(self, session_id):
        """Closes a session (its KV is freed once no read holds it)."""
        self._call(self._stub.CloseSession, spb.CloseSessionRequest(session_id=session_id))
        self._models.pop(session_id, None)

    # -- through registered buffers (the DataPlane service) -------------------------------------

    def open_from_buffer(self, model, tokens, buffer, *, capacity=None, token_offset=0, offset=0,
                         base_position=0, rotated_at=None, rope_table=0):
        """Opens a session whose KV the daemon reads from a registered buffer: with capacity=C,
        the buffer holds [layers, 2, kv_heads, C, head_dim] from byte `offset` and the document's
        KV is at tokens [token_offset, token_offset + n); without, [layers, 2, kv_heads, n,
        head_dim]. Device to device for a GPU session and a CUDA buffer on its device. Returns a
        SessionState (.device: where the session's KV lives)."""
        buffer = self._buffer(buffer)
        req = _shm.dpb.OpenFromBufferRequest(
            header=self._header(model, tokens, base_position, rotated_at, rope_table),
            src=_shm.buffer_range(buffer, offset))
        layout = _layout(capacity, token_offset)
        if layout is not None:
            req.layout.CopyFrom(layout)
        r = self._call(self._client.dataplane.OpenFromBuffer, req)
        s = r.session
        self._models[s.session_id] = model
        return SessionState(s.session_id, s.length, s.version, _ranges(s.fill), r.device,
                            r.bytes_read)

    def fill_from_buffer(self, session_id, buffer, start, end, *, capacity=None, token_offset=0,
                         offset=0, rotated_at=None, rope_table=None, version=None):
        """fill() with the KV of [start, end) read by the daemon from a registered buffer (layout
        as open_from_buffer). Returns a SessionState."""
        buffer = self._buffer(buffer)
        req = _shm.dpb.FillFromBufferRequest(
            header=self._fill_header(session_id, start, end, rotated_at, rope_table, version),
            src=_shm.buffer_range(buffer, offset))
        layout = _layout(capacity, token_offset)
        if layout is not None:
            req.layout.CopyFrom(layout)
        r = self._call(self._client.dataplane.FillFromBuffer, req)
        return SessionState(session_id, r.fill.length, r.fill.version, _ranges(r.fill.fill),
                            None, r.bytes_read)

    def read_to_buffer(self, session_id, buffer, start=None, end=None, *, capacity=None,
                       token_offset=0, offset=0, rope_table=None):
        """read() into a registered buffer: with capacity=C, tokens [start, end) land at tokens
        [token_offset, token_offset + end - start) of [layers, 2, kv_heads, C, head_dim] from byte
        `offset` (nothing else is written); without, [layers, 2, kv_heads, n, head_dim] at
        `offset`. Returns ReadToBufferResponse (.header: range, length, version; .bytes_written).
        Done when it returns: the bytes are in the buffer."""
        buffer = self._buffer(buffer)
        req = _shm.dpb.ReadToBufferRequest(session_id=session_id,
                                           dst=_shm.buffer_range(buffer, offset))
        if start is not None or end is not None:
            a = 0 if start is None else int(start)
            b = self.info(session_id).length if end is None else int(end)
            req.range.start, req.range.end = a, b
        if rope_table is not None:
            req.rope_table = int(rope_table)
        layout = _layout(capacity, token_offset)
        if layout is not None:
            req.layout.CopyFrom(layout)
        return self._call(self._client.dataplane.ReadToBuffer, req)


__all__ = ["Sessions", "SessionState", "EditResult", "insert", "delete", "replace"]
