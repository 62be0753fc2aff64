"""ropekv.retrieval: the Retrieval service of ropekvd (query-aware top-k selection; see
docs/retrieval.md).

    import numpy as np, ropekv
    c = ropekv.Client("127.0.0.1:50051")
    q = np.random.randn(32, 128).astype(np.float32)      # post-RoPE queries of layer 0
    sel = c.select(q, k=256, model="llama", tokens=prompt, n_sink=4, n_local=64,
                   gather=True, keep=True)
    sel.indices[0]                                        # ascending token indices of KV head 0
    sel.keys.shape                                        # (rows, capacity, head_dim)
    keys, values = c.retrieval.gather(sel.selection_id, [1, 2])   # same tokens, layers 1 and 2
    sels = c.select_batch([dict(queries=q_i, k=256, last_block=h_i) for q_i, h_i in batch],
                          model="llama", layer=0)         # a decode batch in one round trip

Every failure raises ropekv.Error (NOT_FOUND: unknown model / session / selection or an uncached
prompt; INVALID_ARGUMENT: bad layer, k, sizes, NaN in the queries).
"""

import dataclasses
import sys

import grpc
import numpy as np

from ropekv import arrays
from ropekv import shm as _shm
from ropekv._pb import pb
from ropekv.errors import Error, grpc_code, invalid, read_stream

try:
    from ropekv.v1 import retrieval_pb2 as rpb
    from ropekv.v1 import retrieval_pb2_grpc as rpb_grpc
except ImportError:  # pragma: no cover - a build without the Retrieval proto
    rpb = rpb_grpc = None

_MODES = {"exact": 0, "bound": 1, "bound_then_exact": 2}
_REDUCTIONS = {"max": 0, "sum": 1, "per_query_head": 2}


@dataclasses.dataclass
class Selection:
    """The answer of Retrieval.select.

    header: the SelectHeader proto (num_tokens, capacity, dtype, ...).
    indices: a list per row (KV head, or query head with reduction "per_query_head") of ascending
      int32 token indices (sink and local tokens included).
    scores: per row float32 scores of `indices` (want_scores), else None.
    padded_indices: the same as one int32 [rows, capacity] array, -1 after each row's count (what
      a frontend indexes its KV with); `indices` are views of its rows.
    counts: int32 [rows], the valid entries of each row.
    mass: float32 [rows] captured softmax mass (want_mass), else None.
    selection_id: the kept selection ("" without keep).
    keys, values: [rows, capacity, head_dim] arrays of the model's dtype (gather), zeros after each
      row's count; else None.
    """

    header: object
    indices: list
    scores: list
    mass: object
    selection_id: str
    padded_indices: object = None
    counts: object = None
    keys: object = None
    values: object = None


def _need_proto():
    if rpb is None:
        raise Error(grpc.StatusCode.UNIMPLEMENTED,
                    "this build has no ropekv/v1/retrieval.proto (rebuild the ropekv_python target)")


def _queries(queries, query_dtype):
    """(bytes, proto DType, query_heads) of a [query_heads, head_dim] array or tensor."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(queries, torch.Tensor):
        t = queries.detach().to("cpu").contiguous()
        if t.dtype == torch.bfloat16:
            queries, query_dtype = t.view(torch.int16).numpy().view(np.uint16), "bf16"
        else:
            queries = t.float().numpy() if t.dtype != torch.float16 else t.numpy()
    a = np.ascontiguousarray(queries)
    if a.ndim != 2:
        raise invalid(f"queries must be [query_heads, head_dim], got shape {a.shape}")
    if query_dtype is None:
        if a.dtype == np.float32:
            query_dtype = "f32"
        elif a.dtype == np.float16:
            query_dtype = "f16"
        elif a.dtype.name == "bfloat16" or a.dtype == np.uint16:
            query_dtype = "bf16"  # ml_dtypes.bfloat16, or the raw bits
        elif a.dtype == np.float64:
            a, query_dtype = a.astype(np.float32), "f32"
        else:
            raise invalid(f"queries must be float32, float16 or bfloat16, got {a.dtype}")
    dt = {"f32": pb.DTYPE_F32, "f16": pb.DTYPE_F16, "bf16": pb.DTYPE_BF16}.get(query_dtype)
    if dt is None:
        raise invalid(f"query_dtype must be f32, f16 or bf16, got {query_dtype!r}")
    return a.tobytes(), dt, a.shape[0]


def _select_request(queries, k, *, model=None, tokens=None, tenant="", last_block=None,
                    session_id=None, layer=0, mode="exact", reduction="max", n_sink=0, n_local=0,
                    candidate_tokens=0, softmax_scale=0.0, want_scores=False, want_mass=False,
                    gather=False, keep=False, query_dtype=None):
    """The SelectRequest of Retrieval.select's arguments."""
    if (session_id is None) == (model is None):
        raise invalid("give either model (+ tokens) or session_id")
    if mode not in _MODES:
        raise invalid(f"mode must be one of {sorted(_MODES)}, got {mode!r}")
    if reduction not in _REDUCTIONS:
        raise invalid(f"reduction must be one of {sorted(_REDUCTIONS)}, got {reduction!r}")
    data, dt, query_heads = _queries(queries, query_dtype)
    req = rpb.SelectRequest(layer=int(layer), query_heads=int(query_heads), queries=data,
                            query_dtype=dt, k=int(k), mode=_MODES[mode],
                            reduction=_REDUCTIONS[reduction], n_sink=int(n_sink),
                            n_local=int(n_local), candidate_tokens=int(candidate_tokens),
                            softmax_scale=float(softmax_scale), want_scores=want_scores,
                            want_mass=want_mass, gather=gather, keep=keep, packed_rows=True)
    if session_id is not None:
        req.source.session_id = session_id
    else:
        req.source.prefix.model = model
        req.source.prefix.tenant = tenant
        if last_block is not None:
            if tokens is not None:
                raise invalid("give tokens or last_block, not both")
            req.source.prefix.last_block = arrays.hash_bytes(last_block)
        else:
            req.source.prefix.tokens.extend(arrays.tokens_list(tokens or []))
    return req


def _selection(header, want_scores, want_mass):
    """The Selection of a SelectHeader (no K/V): its packed rows read in place (a daemon that
    answers SelectedRow messages instead, as before packed_rows, is read row by row)."""
    cap = header.capacity
    if header.HasField("packed"):
        p = header.packed
        counts = np.frombuffer(p.counts, "<i4")
        padded = np.frombuffer(p.indices, "<i4").reshape(len(counts), cap)
        padded_scores = (np.frombuffer(p.scores, "<f4").reshape(len(counts), cap)
                         if want_scores else None)
    else:
        counts = np.array([len(r.indices) for r in header.rows], np.int32)
        padded = np.full((len(counts), cap), -1, np.int32)
        padded_scores = np.full((len(counts), cap), np.nan, np.float32) if want_scores else None
        for i, r in enumerate(header.rows):
            padded[i, :counts[i]] = r.indices
            if want_scores:
                padded_scores[i, :counts[i]] = r.scores
    return Selection(
        header=header,
        indices=[padded[i, :c] for i, c in enumerate(counts)],
        scores=[padded_scores[i, :c] for i, c in enumerate(counts)] if want_scores else None,
        mass=np.array(header.mass, np.float32) if want_mass else None,
        selection_id=header.selection_id,
        padded_indices=padded,
        counts=counts)


def _gather_to_buffer_request(selection_id, layers, buffer, offset):
    """The GatherToBufferRequest into (buffer, offset), the buffer's pending work (a CUDA buffer's
    stream) done first so that the daemon's writes come after it."""
    if isinstance(buffer, _shm.CudaBuffer):
        buffer.synchronize()
    return _shm.dpb.GatherToBufferRequest(selection_id=selection_id,
                                          layers=[int(x) for x in layers],
                                          dst=_shm.buffer_range(buffer, offset))


def _gathered_views(r, buffer, offset):
    """(keys, values) views of what a GatherToBufferResponse `r` says was written at `offset`."""
    n = r.bytes_written // r.layer_bytes if r.layer_bytes else 0
    shape = (n, 2, r.rows, r.capacity, r.head_dim)
    kv = _shm.view(buffer, offset, arrays.numpy_dtype(r.dtype), _shm.torch_dtype_of(r.dtype),
                   shape)
    return kv[:, 0], kv[:, 1]


class Retrieval:
    """The Retrieval service on a ropekv.Client's channel (thread-safe like the client)."""

    def __init__(self, client):
        _need_proto()
        self._client = client
        self.stub = rpb_grpc.RetrievalStub(client.channel)

    def select(self, queries, k, *, model=None, tokens=None, tenant="", last_block=None,
               session_id=None, layer=0,
               mode="exact", reduction="max", n_sink=0, n_local=0, candidate_tokens=0,
               softmax_scale=0.0, want_scores=False, want_mass=False, gather=False, keep=False,
               query_dtype=None):
        """Selects the top-k cached tokens for the post-RoPE `queries` ([query_heads, head_dim]:
        numpy float32 / float16 / bfloat16, or a torch tensor) of `layer`.

        Source: the longest cached prefix of `tokens` of `model` / `tenant`; or, with
        `last_block` (the 32-byte hash, bytes or 64 hex chars, that put() / lookup() returned for
        a prefix's last block) instead of tokens, the prefix that ends there (no tokens sent);
        or the session `session_id`. mode: "exact", "bound" (Quest pages) or "bound_then_exact";
        reduction: "max", "sum" or "per_query_head". Sink tokens [0, n_sink) and the local window
        [N - n_local, N) are always included. Returns a Selection."""
        req = _select_request(
            queries, k, model=model, tokens=tokens, tenant=tenant, last_block=last_block,
            session_id=session_id, layer=layer, mode=mode, reduction=reduction, n_sink=n_sink,
            n_local=n_local, candidate_tokens=candidate_tokens, softmax_scale=softmax_scale,
            want_scores=want_scores, want_mass=want_mass, gather=gather, keep=keep,
            query_dtype=query_dtype)
        header, data = read_stream(self.stub.Select(req, timeout=self._client.timeout), "Select")
        if len(data) != header.gathered_bytes:
            raise Error(grpc.StatusCode.DATA_LOSS,
                        f"Select: want {header.gathered_bytes} gathered bytes, got {len(data)}")
        sel = _selection(header, want_scores, want_mass)
        if gather:
            rows = len(sel.counts)
            kv = np.frombuffer(data, arrays.numpy_dtype(header.dtype)).reshape(
                2, rows, header.capacity, header.head_dim)
            sel.keys, sel.values = kv[0], kv[1]
        return sel

    def select_batch(self, items, **common):
        """Selects for several sources in one round trip: e.g. every sequence of a decode batch
        at one layer. `items`: a list of dicts of select()'s arguments (queries and k included);
        `common`: arguments every item takes unless it gives its own. The daemon runs the items
        concurrently (--retrieval_threads). Returns a list, in the order of `items`, of a
        Selection for each item that succeeded and a ropekv.Error (not raised) for each that did
        not, so that one evicted prefix does not fail the batch. Items return no K/V (gather is
        not allowed: keep=True and gather(), or the data plane). Raises ropekv.Error for the call
        itself: no items, more than 1024, an item with gather (INVALID_ARGUMENT), an answer over
        the daemon's message size (RESOURCE_EXHAUSTED: split the batch)."""
        reqs, wants = [], []
        for i, item in enumerate(items):
            kw = dict(common)
            kw.update(item)
            if kw.get("gather"):
                raise invalid(f"items[{i}]: select_batch returns no K/V (gather); keep the "
                              "selection and gather() it, or select() it alone")
            if "queries" not in kw or "k" not in kw:
                raise invalid(f"items[{i}] needs queries and k")
            reqs.append(_select_request(**kw))
            wants.append((bool(kw.get("want_scores")), bool(kw.get("want_mass"))))
        resp = self._client._call(self.stub.SelectBatch, rpb.SelectBatchRequest(items=reqs))
        if len(resp.items) != len(reqs):
            raise Error(grpc.StatusCode.DATA_LOSS,
                        f"SelectBatch: {len(reqs)} items asked, {len(resp.items)} answered")
        out = []
        for item, (want_scores, want_mass) in zip(resp.items, wants):
            if item.code != 0:
                out.append(Error(grpc_code(item.code), item.message))
            else:
                out.append(_selection(item.header, want_scores, want_mass))
        return out

    def gather(self, selection_id, layers, out=None):
        """The K/V of a kept selection's tokens at `layers` (a list of layer indices): (keys,
        values), each [len(layers), rows, capacity, head_dim] of the model's dtype, zeros after
        each row's count. NOT_FOUND for an unknown or expired selection, or when its prefix
        blocks were evicted.

        out: a registered ShmBuffer / CudaBuffer, or (buffer, offset): the daemon writes
        [len(layers), 2, rows, capacity, head_dim] there itself (DataPlane.GatherToBuffer, no
        bytes through gRPC) and keys / values are views of it (torch for a CudaBuffer)."""
        _need_proto()
        layers = [int(x) for x in layers]
        target = _shm.resolve_out(out)
        if target is not None:
            req = _gather_to_buffer_request(selection_id, layers, *target)
            r = self._client._call(self._client.dataplane.GatherToBuffer, req)
            return _gathered_views(r, *target)
        req = rpb.GatherRequest(selection_id=selection_id, layers=layers)
        header, data = read_stream(self.stub.Gather(req, timeout=self._client.timeout), "Gather")
        if len(data) != header.total_bytes:
            raise Error(grpc.StatusCode.DATA_LOSS,
                        f"Gather: want {header.total_bytes} bytes, got {len(data)}")
        kv = np.frombuffer(data, arrays.numpy_dtype(header.dtype)).reshape(
            len(layers), 2, header.rows, header.capacity, header.head_dim)
        return kv[:, 0], kv[:, 1]

    def gather_batch(self, items):
        """gather(..., out=) for several kept selections in one round trip (e.g. a decode batch
        after select_batch(keep=True)): `items` is a list of (selection_id, layers, out), out a
        registered ShmBuffer / CudaBuffer or (buffer, offset) as for gather. Returns, in order,
        (keys, values) views of each item's buffer, or a ropekv.Error (not raised) for an item
        that failed (an expired selection, evicted blocks, a range too small: nothing written
        for it). Raises ropekv.Error for the call: no items or more than 1024 (INVALID_ARGUMENT).
        The daemon runs the items in order (DataPlane.GatherBatchToBuffer)."""
        _need_proto()
        reqs, targets = [], []
        for i, (selection_id, layers, out) in enumerate(items):
            target = _shm.resolve_out(out)
            if target is None:
                raise invalid(f"items[{i}]: out must be a registered buffer or (buffer, offset)")
            reqs.append(_gather_to_buffer_request(selection_id, layers, *target))
            targets.append(target)
        resp = self._client._call(self._client.dataplane.GatherBatchToBuffer,
                                  _shm.dpb.GatherBatchToBufferRequest(items=reqs))
        if len(resp.items) != len(reqs):
            raise Error(grpc.StatusCode.DATA_LOSS,
                        f"GatherBatchToBuffer: {len(reqs)} items asked, {len(resp.items)} answered")
        return [Error(grpc_code(item.code), item.message) if item.code != 0
                else _gathered_views(item.result, *target)
                for item, target in zip(resp.items, targets)]

    def release(self, selection_id):
        """Drops a kept selection. NOT_FOUND when unknown."""
        self._client._call(self.stub.ReleaseSelection,
                           rpb.ReleaseSelectionRequest(selection_id=selection_id))

    def stats(self):
        """The RetrievalStatsResponse (selects, gathers, metadata_* counters, selections,
        gpu_selects, gpu_fallbacks)."""
        return self._client._call(self.stub.Stats, rpb.RetrievalStatsRequest())
