"""ropekv.Client: typed calls to ropekvd over a gRPC channel.

KV travels as numpy arrays [blocks, layers, 2, kv_heads, block_tokens, head_dim] (see
ropekv.arrays); bulk bytes are chunked below the channel's maximum message size (Put is
client-streaming, Get server-streaming). Every failure raises ropekv.Error with a
grpc.StatusCode.

Thread safety: a Client may be shared by threads (gRPC channels and stubs are thread-safe; the
model-spec cache is guarded by a lock).
"""

import threading
from concurrent import futures

import grpc
import numpy as np

from ropekv import arrays
from ropekv import shm as _shm
from ropekv._pb import grpc_modules, has_field, pb, pb_grpc
from ropekv.errors import Error, invalid, read_stream
from ropekv.spec import model_spec

_HEALTH_CHECK = "/grpc.health.v1.Health/Check"
MAX_STREAMS = 64  # connections of one parallel Get (Client.get's streams)
# grpc.health.v1.HealthCheckResponse.ServingStatus
_SERVING_STATUS = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def _varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(raw, i, what):
    value, shift = 0, 0
    while True:
        if i >= len(raw) or shift > 63:
            raise Error(grpc.StatusCode.DATA_LOSS, f"{what}: a varint runs past the message")
        b = raw[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def _fields(raw, what):
    """The fields of a serialized protobuf message, in order: (number, value), the value an int
    for a varint and a (start, end) range of `raw` for a length-delimited field; fixed-width
    fields are skipped. DATA_LOSS for a field that runs past the message or a bad wire type."""
    i = 0
    while i < len(raw):
        key, i = _read_varint(raw, i, what)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(raw, i, what)
            yield field, value
        elif wire == 2:
            length, i = _read_varint(raw, i, what)
            if i + length > len(raw):
                raise Error(grpc.StatusCode.DATA_LOSS, f"{what}: a field runs past the message")
            yield field, (i, i + length)
            i += length
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            raise Error(grpc.StatusCode.DATA_LOSS, f"{what}: bad wire type {wire}")


def _health_status(raw):
    """The `status` (field 1, varint) of a serialized HealthCheckResponse; 0 when absent."""
    status = 0
    for field, value in _fields(raw, "health response"):
        if field == 1 and isinstance(value, int):
            status = value
    return status


class Client:
    """A connection to one ropekvd.

    Args:
      address: "HOST:PORT" of the daemon.
      timeout: deadline of each call, seconds.
      max_message_bytes: the channel's send/receive limit (the daemon's default is 64 MiB).
      chunk_bytes: KV bytes per streamed Put message (must stay below both sides' limit).
      channel_options: extra grpc channel options, a list of (key, value).
    The channel connects lazily: construction never fails for an unreachable daemon.
    """

    def __init__(self, address="127.0.0.1:50051", *, timeout=120.0,
                 max_message_bytes=64 << 20, chunk_bytes=4 << 20, channel_options=()):
        if not address:
            raise invalid("address must be HOST:PORT, got an empty string")
        if chunk_bytes <= 0 or chunk_bytes > max_message_bytes - (1 << 16):
            raise invalid(f"chunk_bytes must be in (0, max_message_bytes - 64 KiB], got {chunk_bytes}")
        self.address = address
        self.timeout = timeout
        self.chunk_bytes = int(chunk_bytes)
        options = [
            ("grpc.max_send_message_length", int(max_message_bytes)),
            ("grpc.max_receive_message_length", int(max_message_bytes)),
            # A TCP connection of its own: grpc otherwise shares one among all channels of the
            # process to the same address, and clients moving bytes in parallel queue on it.
            ("grpc.use_local_subchannel_pool", 1),
        ] + list(channel_options)
        self._options = options
        self.channel = grpc.insecure_channel(address, options=options)
        self._stream_channels = []  # further connections of parallel Gets, made on first use
        self._pool, self._pool_workers = None, 0  # their threads
        self.kvcache = pb_grpc.KVCacheStub(self.channel)
        self._stream_stubs = [self.kvcache]  # a stub per connection of parallel Gets
        self._health = self.channel.unary_unary(_HEALTH_CHECK)
        self._specs = {}  # model id or name -> ModelSpec
        self._lock = threading.Lock()
        self._dataplane = None  # DataPlane stub, made on first use (ropekv.shm)

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self):
        self.channel.close()
        for ch in self._stream_channels:
            ch.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def wait_ready(self, timeout=10.0):
        """Blocks until the channel is connected. UNAVAILABLE when it is not within `timeout` s."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise Error(grpc.StatusCode.UNAVAILABLE,
                        f"ropekvd at {self.address} not reachable within {timeout} s") from None

    def stub(self, service):
        """A stub of any generated ropekv service by name ("KVCache", "Sessions", ...), on this
        client's channel. NOT_FOUND when no generated module defines it."""
        for mod in grpc_modules():
            cls = getattr(mod, f"{service}Stub", None)
            if cls is not None:
                return cls(self.channel)
        raise Error(grpc.StatusCode.NOT_FOUND, f"no generated ropekv service named {service!r}")

    def _call(self, fn, request, **kw):
        try:
            return fn(request, timeout=self.timeout, **kw)
        except grpc.RpcError as e:
            raise Error.from_rpc(e) from None

    # -- admin ----------------------------------------------------------------------------------

    def health(self, service=""):
        """grpc.health.v1 Check: "SERVING" when the daemon serves; raises ropekv.Error
        UNAVAILABLE when it answers anything else (or cannot be reached)."""
        request = b"" if not service else b"\x0a" + _varint(len(service.encode())) + service.encode()
        raw = self._call(self._health, request)
        status = _SERVING_STATUS.get(_health_status(raw), "UNKNOWN")
        if status != "SERVING":
            raise Error(grpc.StatusCode.UNAVAILABLE, f"health: want SERVING, got {status}")
        return status

    def register_model(self, spec=None, name="", **kwargs):
        """Registers a model (idempotent: the id is a stable hash of the spec). `spec` is a dict,
        a ModelSpec proto or keyword arguments (see ropekv.spec). Returns the
        RegisterModelResponse (.model_id, .created). INVALID_ARGUMENT for a bad spec,
        ALREADY_EXISTS when `name` names another model."""
        spec = model_spec(spec, **kwargs)
        resp = self._call(self.kvcache.RegisterModel, pb.RegisterModelRequest(spec=spec, name=name))
        with self._lock:
            self._specs[resp.model_id] = spec
            if name:
                self._specs[name] = spec
        return resp

    def list_models(self):
        """Every registered model: a list of ModelInfo (.model_id, .names, .spec, .block_bytes,
        .blocks)."""
        resp = self._call(self.kvcache.ListModels, pb.ListModelsRequest())
        with self._lock:
            for m in resp.models:
                self._specs[m.model_id] = m.spec
                for n in m.names:
                    self._specs[n] = m.spec
        return list(resp.models)

    def spec(self, model):
        """The ModelSpec of a model id or name (cached). NOT_FOUND when it is not registered."""
        with self._lock:
            s = self._specs.get(model)
        if s is None:
            self.list_models()
            with self._lock:
                s = self._specs.get(model)
        if s is None:
            raise Error(grpc.StatusCode.NOT_FOUND, f"model {model!r} is not registered")
        return s

    def stats(self):
        """The daemon's StatsResponse (.tiers, .lookups, .puts, .gets, .bytes_in, ...)."""
        return self._call(self.kvcache.Stats, pb.StatsRequest())

    def evict(self, model, tokens=(), tenant=""):
        """Evicts the cached prefix blocks of `tokens` and what hangs off them (empty: every
        unpinned block of the model); pinned blocks stay. Returns the number evicted."""
        req = pb.EvictRequest(model=model, tenant=tenant, tokens=arrays.tokens_list(tokens))
        return self._call(self.kvcache.Evict, req).blocks_evicted

    def pin(self, model, tokens, tenant="", pin=True):
        """Pins (pin=False: unpins) the cached prefix blocks of `tokens`; returns their count."""
        req = pb.PinRequest(model=model, tenant=tenant, tokens=arrays.tokens_list(tokens), pin=pin)
        return self._call(self.kvcache.Pin, req).blocks

    def unpin(self, model, tokens, tenant=""):
        return self.pin(model, tokens, tenant=tenant, pin=False)

    # -- data -----------------------------------------------------------------------------------

    def put(self, model, tokens, kv, tenant="", parent=None, rotated_at=None, pin=False,
            rope_table=0, pre_rope=False):
        """Stores the KV of `tokens` (a multiple of block_tokens of them).

        kv: [blocks, layers, 2, kv_heads, block_tokens, head_dim] numpy array (bf16 as uint16 /
          int16 bits or ml_dtypes.bfloat16), a torch tensor of that shape (any device), or raw
          bytes. parent: the 32-byte hash (bytes, or 64 hex chars) of the block before the first
          one (from a previous PutResponse.block_hashes); None = the prefix starts here.
          rotated_at: position the first token's key was rotated at (default: its position in the
          prefix).
        Returns the PutResponse (.blocks_stored, .blocks_existing, .block_hashes).
        Raises INVALID_ARGUMENT locally when kv does not match the model or the token count;
        NOT_FOUND for an unknown model or an uncached parent; RESOURCE_EXHAUSTED when full.
        """
        spec = self.spec(model)
        tokens = arrays.tokens_list(tokens)
        data, blocks = arrays.kv_bytes(kv, spec)
        if len(tokens) != blocks * spec.block_tokens:
            raise invalid(f"{blocks} blocks of block_tokens = {spec.block_tokens} need "
                          f"{blocks * spec.block_tokens} tokens, got {len(tokens)}")
        header = pb.PutHeader(model=model, tenant=tenant, tokens=tokens, pin=pin,
                              rope_table=rope_table, pre_rope=pre_rope)
        if parent is not None:
            header.parent = arrays.hash_bytes(parent)
        if rotated_at is not None:
            header.rotated_at = int(rotated_at)
        return self._put(header, data)

    def put_segment(self, model, tokens, kv, tenant="", rotated_at=None, pin=False):
        """Stores a position-independent segment (a module, a document): keyed by its tokens
        alone; any positive token count, kv holds ceil(tokens / block_tokens) blocks (the last one
        padded). Needs a daemon whose API has PutHeader.segment (UNIMPLEMENTED otherwise)."""
        if not has_field(pb.PutHeader, "segment"):
            raise Error(grpc.StatusCode.UNIMPLEMENTED, "this API revision has no segments")
        spec = self.spec(model)
        tokens = arrays.tokens_list(tokens)
        data, blocks = arrays.kv_bytes(kv, spec)
        want = -(-len(tokens) // spec.block_tokens)
        if not tokens or blocks != want:
            raise invalid(f"a segment of {len(tokens)} tokens needs {want} blocks of "
                          f"block_tokens = {spec.block_tokens}, got {blocks}")
        header = pb.PutHeader(model=model, tenant=tenant, tokens=tokens, pin=pin, segment=True)
        if rotated_at is not None:
            header.rotated_at = int(rotated_at)
        return self._put(header, data)

    def _put(self, header, data):
        chunk = self.chunk_bytes

        def requests():
            yield pb.PutRequest(header=header, data=data[:chunk].tobytes())
            for off in range(chunk, data.size, chunk):
                yield pb.PutRequest(data=data[off:off + chunk].tobytes())

        try:
            return self.kvcache.Put(requests(), timeout=self.timeout)
        except grpc.RpcError as e:
            raise Error.from_rpc(e) from None

    def lookup(self, model, tokens, tenant="", segment=False):
        """The longest cached prefix of `tokens`: LookupResponse (.matched_tokens, a multiple of
        block_tokens; .blocks with hash, tier, rotated_at, pinned). segment=True: the segment of
        exactly these tokens, all or nothing. NOT_FOUND for an unknown model."""
        req = pb.LookupRequest(model=model, tenant=tenant, tokens=arrays.tokens_list(tokens))
        if segment:
            if not has_field(pb.LookupRequest, "segment"):
                raise Error(grpc.StatusCode.UNIMPLEMENTED, "this API revision has no segments")
            req.segment = True
        return self._call(self.kvcache.Lookup, req)

    def get(self, model, tokens, tenant="", target_position=None, max_blocks=0, out=None,
            block_ids=None, first_block=0, streams=1):
        """Fetches the KV of the longest cached prefix of `tokens`.

        target_position: where the prompt's first token's key should sit; keys are re-rotated
          from their stored position by the daemon, in one rotation; values are returned as
          stored. None: as stored.
        max_blocks: at most this many blocks (0 = all matched, from first_block on).
        first_block: blocks [first_block, first_block + max_blocks) of the prefix (none when it
          is shorter); the header's first_block says so.
        streams: connections the bytes come over (at most MAX_STREAMS, 64, and a block each).
          With more than one, a lookup sizes the prefix, then as many block ranges of it are
          read at once, each over a connection of its own (made on first use and kept). Blocks evicted between the lookup and the reads end the
          answer where a Get would have ended it. Not with a registered buffer as `out` (the
          daemon writes those itself).
        out: optional writable C-contiguous numpy array to receive the bytes (reused buffers);
          OUT_OF_RANGE when it is smaller than the answer. Or a registered ShmBuffer /
          CudaBuffer, or a (buffer, offset) pair: the daemon writes the blocks there itself
          (GetToBuffer, no bytes through gRPC) and the array returned is a view into the buffer
          (a torch tensor for a CudaBuffer); INVALID_ARGUMENT when the buffer cannot hold them.
        block_ids: with `out` a buffer registered with a paged layout (paged=): block i goes to
          page block_ids[i] of every layer's K and V pool (at most len(block_ids) blocks; other
          pages untouched); the array returned is then the whole pool, [layers, 2, num_blocks,
          block_tokens, kv_heads, head_dim]. Bad ids are INVALID_ARGUMENT, nothing written.
        Returns (GetHeader, array [blocks, layers, 2, kv_heads, block_tokens, head_dim] of
        numpy_dtype(spec.dtype)); blocks is 0 on a miss. NOT_FOUND for an unknown model,
        INVALID_ARGUMENT for a negative target_position, DATA_LOSS when the stream is short.
        """
        spec = self.spec(model)
        if first_block < 0 or streams < 1:
            raise invalid(f"first_block must be >= 0 and streams >= 1, got {first_block}, {streams}")
        if _shm.resolve_out(out) is not None:
            if first_block:
                raise invalid("first_block is not available with out= a registered buffer")
            return self._get_to_buffer(spec, model, tokens, tenant, target_position, max_blocks,
                                       out, block_ids)
        if block_ids is not None:
            raise invalid("block_ids need out= a buffer registered with a paged layout")
        req = pb.GetRequest(model=model, tenant=tenant, tokens=arrays.tokens_list(tokens),
                            max_blocks=max_blocks)
        if first_block:
            if not has_field(pb.GetRequest, "first_block"):
                raise Error(grpc.StatusCode.UNIMPLEMENTED, "this API revision has no block ranges")
            req.first_block = int(first_block)
        if target_position is not None:
            req.target_position = int(target_position)
        if streams > 1:
            return self._get_parallel(spec, req, streams, out)
        return self._get_one(spec, req, out)

    def _get_one(self, spec, req, out):
        """A Get over this client's own connection into `out` (or a new array)."""
        header, flat = self._get_stream(self.kvcache, spec, req,
                                        lambda total: self._buffer(out, total, spec))
        return header, self._kv(spec, flat, header.blocks)

    @staticmethod
    def _kv(spec, flat, blocks):
        flat = flat[:blocks * arrays.block_bytes(spec)]
        return flat.view(arrays.numpy_dtype(spec.dtype)).reshape(arrays.kv_shape(spec, blocks))

    def _get_stream(self, stub, spec, req, reserve):
        """One Get stream: (GetHeader, the flat uint8 array reserve(bytes) gave, filled)."""
        stream = None
        try:
            # A range's own connection (not the client's) to a daemon that has just answered
            # the lookup: a failed connect is transient, so the call waits for it.
            stream = stub.Get(req, timeout=self.timeout, wait_for_ready=stub is not self.kvcache)
            header, flat, filled = None, None, 0
            for msg in stream:
                if header is None:
                    if not msg.HasField("header"):
                        raise Error(grpc.StatusCode.DATA_LOSS, "Get: the first message has no header")
                    header = msg.header
                    want_bb = arrays.block_bytes(spec)
                    if header.blocks and header.block_bytes != want_bb:
                        raise Error(grpc.StatusCode.DATA_LOSS,
                                    f"Get: blocks of model {req.model} have {want_bb} bytes, the "
                                    f"daemon sent {header.block_bytes}")
                    flat = reserve(header.blocks * want_bb)
                n = len(msg.data)
                if filled + n > flat.size:
                    raise Error(grpc.StatusCode.DATA_LOSS,
                                f"Get: want {flat.size} bytes, the daemon sent more")
                if n:
                    flat[filled:filled + n] = np.frombuffer(msg.data, np.uint8)
                    filled += n
        except grpc.RpcError as e:
            raise Error.from_rpc(e) from None
        except Error:
            if stream is not None:
                stream.cancel()
            raise
        if header is None:
            raise Error(grpc.StatusCode.DATA_LOSS, "Get: the stream ended without a header")
        if filled != flat.size:
            raise Error(grpc.StatusCode.DATA_LOSS,
                        f"Get: want {flat.size} bytes of {header.blocks} blocks, got {filled}")
        return header, flat

    def _get_parallel(self, spec, req, streams, out):
        match = self.lookup(req.model, req.tokens, tenant=req.tenant)
        first = min(req.first_block, len(match.blocks))
        count = len(match.blocks) - first
        if req.max_blocks:
            count = min(count, req.max_blocks)
        streams = min(streams, count, MAX_STREAMS)
        if streams <= 1:
            return self._get_one(spec, req, out)
        bb = arrays.block_bytes(spec)
        flat = self._buffer(out, count * bb, spec)
        start = [count * r // streams for r in range(streams + 1)]

        def read(r):
            part = pb.GetRequest()
            part.CopyFrom(req)
            part.first_block = first + start[r]
            part.max_blocks = start[r + 1] - start[r]
            dst = flat[start[r] * bb:start[r + 1] * bb]

            def reserve(total):
                if total > dst.size:
                    raise Error(grpc.StatusCode.DATA_LOSS, "Get: a range longer than asked for")
                return dst[:total]
            return self._get_stream(self._stream_stub(r), spec, part, reserve)[0]

        with self._lock:
            if self._pool_workers < streams - 1:  # (a smaller pool in use ends when unused)
                self._pool = futures.ThreadPoolExecutor(max_workers=streams - 1,
                                                        thread_name_prefix="ropekv-get")
                self._pool_workers = streams - 1
            pool = self._pool
        parts = [pool.submit(read, r) for r in range(1, streams)]
        try:
            first_part = read(0)
        finally:
            futures.wait(parts)  # every range has ended before the answer or an error returns
        # The ranges in order, up to the first that came back short (evicted meanwhile); an
        # error of a range before that is raised.
        header = pb.GetHeader(block_bytes=bb, first_block=first)
        for r in range(streams):
            h = first_part if r == 0 else parts[r - 1].result()
            header.blocks += h.blocks
            header.matched_tokens += h.matched_tokens
            header.block_info.extend(h.block_info)
            if h.blocks < start[r + 1] - start[r]:
                break
        return header, self._kv(spec, flat, header.blocks)

    def _stream_stub(self, i):
        """The KVCache stub of connection i of a parallel Get: this client's own for 0, the others
        made on first use and kept."""
        with self._lock:
            while len(self._stream_stubs) <= i:
                self._stream_channels.append(
                    grpc.insecure_channel(self.address, options=self._options))
                self._stream_stubs.append(pb_grpc.KVCacheStub(self._stream_channels[-1]))
            return self._stream_stubs[i]

    @staticmethod
    def _buffer(out, total, spec):
        if out is None:
            return np.empty(total, np.uint8)
        if arrays.is_torch_tensor(out):
            raise invalid("out must be a numpy array (use get_torch for tensors)")
        if not isinstance(out, np.ndarray) or not out.flags.c_contiguous or not out.flags.writeable:
            raise invalid("out must be a writable C-contiguous numpy array")
        if out.nbytes < total:
            raise Error(grpc.StatusCode.OUT_OF_RANGE,
                        f"out holds {out.nbytes} bytes, the answer needs {total}")
        return out.reshape(-1).view(np.uint8)[:total]

    def get_torch(self, model, tokens, tenant="", target_position=None, max_blocks=0,
                  device=None, streams=1):
        """get() as a torch tensor of the model's dtype (torch.bfloat16 for bf16) on `device`."""
        spec = self.spec(model)
        header, arr = self.get(model, tokens, tenant=tenant, target_position=target_position,
                               max_blocks=max_blocks, streams=streams)
        return header, arrays.numpy_to_torch(arr, spec.dtype, device)

    def compose(self, model, parts, tenant="", out=None):
        """The KV of a prompt assembled from cached parts (needs a daemon with Compose).

        parts: a list of dicts {"tokens": [...], "segment": bool, "target_position": int or None}.
        out: None, or a registered buffer / (buffer, offset): the daemon writes the prompt there
          (ComposeToBuffer) and the array returned is a view into it.
        Returns (ComposeHeader, array [layers, 2, kv_heads, total_tokens, head_dim])."""
        if not hasattr(self.kvcache, "Compose"):
            raise Error(grpc.StatusCode.UNIMPLEMENTED, "this API revision has no Compose")
        spec = self.spec(model)
        if _shm.resolve_out(out) is not None:
            return self._compose_to_buffer(spec, model, parts, tenant, out)
        req = pb.ComposeRequest(model=model, tenant=tenant)
        for p in parts:
            part = req.parts.add(tokens=arrays.tokens_list(p["tokens"]),
                                 segment=bool(p.get("segment", False)))
            if p.get("target_position") is not None:
                part.target_position = int(p["target_position"])
        header, data = read_stream(self.kvcache.Compose(req, timeout=self.timeout), "Compose")
        dt = arrays.numpy_dtype(spec.dtype)
        shape = (spec.layers, 2, spec.kv_heads, header.total_tokens, spec.head_dim)
        want = int(np.prod(shape)) * dt.itemsize
        if len(data) != want:
            raise Error(grpc.StatusCode.DATA_LOSS, f"Compose: want {want} bytes, got {len(data)}")
        return header, np.frombuffer(data, dt).reshape(shape)

    # -- editor sessions (PIE): ropekv.sessions, docs/sessions.md ------------------------------

    @property
    def sessions(self):
        """The Sessions service and the session calls of the DataPlane (ropekv.sessions.Sessions)
        on this client's channel: open / edit / fill / read / snapshot / info / close, and
        open_from_buffer / fill_from_buffer / read_to_buffer with registered buffers."""
        s = getattr(self, "_sessions", None)
        if s is None:
            from ropekv.sessions import Sessions

            s = self._sessions = Sessions(self)
        return s

    # -- retrieval: query-aware top-k selection (ropekv.retrieval, docs/retrieval.md) ----------

    @property
    def retrieval(self):
        """The Retrieval service (ropekv.retrieval.Retrieval) on this client's channel."""
        r = getattr(self, "_retrieval", None)
        if r is None:
            from ropekv.retrieval import Retrieval

            r = self._retrieval = Retrieval(self)
        return r

    def select(self, queries, k, **kwargs):
        """Query-aware top-k selection over a cached prefix (model=, tokens=, tenant=) or a
        session (session_id=): see ropekv.retrieval.Retrieval.select. Returns a
        ropekv.retrieval.Selection; with keep=True, `client.retrieval.gather(sel.selection_id,
        layers)` returns the same tokens' K/V at other layers."""
        return self.retrieval.select(queries, k, **kwargs)

    def select_batch(self, items, **common):
        """Several selections in one round trip (e.g. a decode batch at one layer): see
        ropekv.retrieval.Retrieval.select_batch. Returns a Selection or a ropekv.Error an item."""
        return self.retrieval.select_batch(items, **common)

    # -- data plane: registered buffers (ropekv.shm, docs/dataplane.md) -------------------------

    @property
    def dataplane(self):
        """The DataPlane stub on this client's channel."""
        _shm._need_dataplane()
        if self._dataplane is None:
            self._dataplane = _shm.dpb_grpc.DataPlaneStub(self.channel)
        return self._dataplane

    def create_shm(self, size, name=None):
        """A new ShmBuffer of `size` bytes, registered with the daemon under its name."""
        buf = _shm.ShmBuffer(size, name=name)
        try:
            self.register_shm(buf)
        except BaseException:
            buf.close()
            raise
        return buf

    def register_shm(self, shm, size=0, name=None, paged=None):
        """Registers shared memory: a ShmBuffer, or the name of a POSIX shared-memory object
        someone created ("/name" or "name"), its first `size` bytes (0: all). `name` is what
        later calls call it (default: the region's name). Returns the BufferInfo.
        paged: (model, num_blocks): the buffer holds a vLLM-style paged pool of that model,
        [layers, 2, num_blocks, block_tokens, kv_heads, head_dim] (docs/dataplane.md); get() and
        put_from_buffer() may then name pages by block_ids.
        FAILED_PRECONDITION when the daemon does not allow registration; NOT_FOUND for a missing
        object; INVALID_ARGUMENT for a bad name or a size past the object; ALREADY_EXISTS."""
        if isinstance(shm, _shm.ShmBuffer):
            shm_name, size = shm.shm_name, int(size) or shm.size
            reg = name or shm.name
        else:
            shm_name = shm if str(shm).startswith("/") else "/" + str(shm)
            reg = name or shm_name.lstrip("/")
        req = _shm.dpb.RegisterBufferRequest(
            name=reg, shm=_shm.dpb.ShmRegion(shm_name=shm_name, size=int(size)))
        _shm.set_paged(req, paged)
        info = self._call(self.dataplane.RegisterBuffer, req).buffer
        if isinstance(shm, _shm.ShmBuffer):
            shm.name, shm._client = reg, self
            shm.paged_blocks = None if paged is None else int(paged[1])
        return info

    def register_cuda(self, tensor, name=None, device=None, paged=None):
        """Registers a contiguous torch CUDA tensor by its CUDA IPC handle; returns a CudaBuffer
        (use it as `out=`, or as put_from_buffer's source). paged: (model, num_blocks) as
        register_shm (a tensor [layers, 2, num_blocks, block_tokens, kv_heads, head_dim]).
        UNAVAILABLE from a daemon without CUDA or a GPU."""
        buf = _shm.CudaBuffer(tensor, name=name, device=device)
        req = _shm.dpb.RegisterBufferRequest(
            name=buf.name, cuda_ipc=_shm.dpb.CudaIpcRegion(
                device=buf.device, handle=buf.handle, offset=buf.offset, size=buf.size))
        _shm.set_paged(req, paged)
        self._call(self.dataplane.RegisterBuffer, req)
        buf._client = self
        buf.paged_blocks = None if paged is None else int(paged[1])
        return buf

    def unregister_buffer(self, name):
        """Unregisters a buffer (a name or a buffer); the daemon first waits for its copies in
        flight. Returns how many it waited for. NOT_FOUND when it is not registered."""
        name = getattr(name, "name", name)
        req = _shm.dpb.UnregisterBufferRequest(name=name)
        return self._call(self.dataplane.UnregisterBuffer, req).waited_copies

    def list_buffers(self):
        """ListBuffersResponse: .buffers (BufferInfo: name, kind, size, copies, ...) and
        .registration_allowed."""
        return self._call(self.dataplane.ListBuffers, _shm.dpb.ListBuffersRequest())

    def put_from_buffer(self, model, tokens, buffer, offset=0, tenant="", parent=None,
                        rotated_at=None, pin=False, rope_table=0, pre_rope=False, segment=False,
                        block_ids=None):
        """put() / put_segment() with the blocks' bytes read by the daemon from a registered
        buffer at `offset` (block layout, as put), or from pages `block_ids` of a paged buffer
        (one id per block). Returns PutFromBufferResponse (.blocks_stored, .blocks_existing,
        .block_hashes, .bytes_read)."""
        if isinstance(buffer, _shm.CudaBuffer):
            buffer.synchronize()
        header = pb.PutHeader(model=model, tenant=tenant, tokens=arrays.tokens_list(tokens),
                              pin=pin, rope_table=rope_table, pre_rope=pre_rope)
        if segment:
            header.segment = True
        if parent is not None:
            header.parent = arrays.hash_bytes(parent)
        if rotated_at is not None:
            header.rotated_at = int(rotated_at)
        req = _shm.dpb.PutFromBufferRequest(
            header=header, src=_shm.buffer_range(buffer, offset, block_ids=block_ids))
        return self._call(self.dataplane.PutFromBuffer, req)

    def _get_to_buffer(self, spec, model, tokens, tenant, target_position, max_blocks, out,
                       block_ids=None):
        buffer, offset = _shm.resolve_out(out)
        if isinstance(buffer, _shm.CudaBuffer):
            buffer.synchronize()
        req = _shm.dpb.GetToBufferRequest(
            model=model, tenant=tenant, tokens=arrays.tokens_list(tokens), max_blocks=max_blocks,
            dst=_shm.buffer_range(buffer, offset, block_ids=block_ids))
        if target_position is not None:
            req.target_position = int(target_position)
        resp = self._call(self.dataplane.GetToBuffer, req)
        header = resp.header
        if block_ids is not None:
            return header, _shm.view(buffer, 0, arrays.numpy_dtype(spec.dtype),
                                     _shm.torch_dtype_of(spec.dtype),
                                     _shm.paged_shape(spec, buffer.paged_blocks))
        return header, _shm.view(buffer, offset, arrays.numpy_dtype(spec.dtype),
                                 _shm.torch_dtype_of(spec.dtype),
                                 arrays.kv_shape(spec, header.blocks))

    def _compose_to_buffer(self, spec, model, parts, tenant, out):
        buffer, offset = _shm.resolve_out(out)
        if isinstance(buffer, _shm.CudaBuffer):
            buffer.synchronize()
        req = _shm.dpb.ComposeToBufferRequest(model=model, tenant=tenant,
                                              dst=_shm.buffer_range(buffer, offset))
        for p in parts:
            part = req.parts.add(tokens=arrays.tokens_list(p["tokens"]),
                                 segment=bool(p.get("segment", False)))
            if p.get("target_position") is not None:
                part.target_position = int(p["target_position"])
        resp = self._call(self.dataplane.ComposeToBuffer, req)
        shape = (spec.layers, 2, spec.kv_heads, resp.header.total_tokens, spec.head_dim)
        return resp.header, _shm.view(buffer, offset, arrays.numpy_dtype(spec.dtype),
                                      _shm.torch_dtype_of(spec.dtype), shape)
