"""The data plane from Python: buffers registered with ropekvd once, then filled (or read) by the
daemon directly, so that bulk KV never travels through protobuf (docs/dataplane.md).

    import ropekv
    c = ropekv.Client(addr)
    buf = c.create_shm(1 << 30)                 # a POSIX shared-memory region, registered
    header, kv = c.get(model, tokens, out=buf)  # kv: a numpy view into buf, no copy
    c.put_from_buffer(model, tokens2, buf)      # the daemon reads the blocks from buf
    buf.close()                                 # unregisters (waits for copies), unlinks

ShmBuffer: a region this process creates (multiprocessing.shared_memory), with numpy and torch
views of any part of it. CudaBuffer: a torch CUDA tensor shared with the daemon by its CUDA IPC
handle (needs a CUDA build of ropekvd on the same host with a GPU).

`out=` accepts a buffer (bytes from offset 0) or a (buffer, offset) pair. Registration is
refused (FAILED_PRECONDITION) by a daemon that does not allow it (--allow_buffers; by default
only daemons listening on loopback do).
"""

import os
import secrets
from multiprocessing import shared_memory

import grpc
import numpy as np

from ropekv.errors import Error, invalid

try:
    from ropekv.v1 import dataplane_pb2 as dpb  # noqa: F401
    from ropekv.v1 import dataplane_pb2_grpc as dpb_grpc  # noqa: F401
except ImportError:  # pragma: no cover - an API revision without the data plane
    dpb = None
    dpb_grpc = None


def _need_dataplane():
    if dpb is None:
        raise Error(grpc.StatusCode.UNIMPLEMENTED,
                    "this build of the ropekv package has no DataPlane service (dataplane.proto)")


class ShmBuffer:
    """A POSIX shared-memory region created by this process.

    Args:
      size: bytes.
      name: the region's name without the leading '/' (default: a fresh "ropekv-<pid>-<hex>").
    Attributes: `name` (the name the daemon knows the buffer by once registered; the region's
    name by default), `shm_name` ("/" + region name, what shm_open takes), `size`, `buf` (a
    writable memoryview of the whole region).

    close() unregisters the buffer (the daemon waits for copies in flight) and unlinks the region.
    Views from array()/tensor() must be dropped first: Python refuses to unmap exported memory.
    """

    def __init__(self, size, name=None):
        size = int(size)
        if size <= 0:
            raise invalid(f"a shared-memory buffer needs a positive size, got {size}")
        name = name or f"ropekv-{os.getpid()}-{secrets.token_hex(6)}"
        name = name.lstrip("/")
        try:
            self._shm = shared_memory.SharedMemory(name=name, create=True, size=size)
        except FileExistsError:
            raise Error(grpc.StatusCode.ALREADY_EXISTS,
                        f"shared memory /{name} exists already") from None
        except OSError as e:
            raise Error(grpc.StatusCode.INTERNAL, f"shared memory /{name}: {e}") from None
        self.size = size
        self.shm_name = "/" + self._shm.name.lstrip("/")
        self.name = self._shm.name.lstrip("/")
        self.paged_blocks = None  # pages per pool when registered with a paged layout
        self._client = None  # the client it is registered with

    @property
    def buf(self):
        return self._shm.buf

    def array(self, dtype, shape, offset=0):
        """A numpy view (no copy) of the region: `shape` elements of `dtype` from byte `offset`."""
        dtype = np.dtype(dtype)
        n = int(np.prod(shape)) * dtype.itemsize
        if offset < 0 or offset + n > self.size:
            raise invalid(f"a view of {n} bytes at offset {offset} leaves the buffer of "
                          f"{self.size} bytes")
        return np.ndarray(shape, dtype=dtype, buffer=self._shm.buf, offset=offset)

    def bytes_view(self, offset=0, length=None):
        """A uint8 numpy view of [offset, offset + length) (to the end by default)."""
        length = self.size - offset if length is None else length
        return self.array(np.uint8, (length,), offset)

    def tensor(self, dtype, shape, offset=0):
        """A CPU torch tensor view (no copy) of the region; dtype a torch dtype."""
        import torch

        item = torch.empty((), dtype=dtype).element_size()
        n = int(np.prod(shape)) * item
        if offset < 0 or offset + n > self.size:
            raise invalid(f"a view of {n} bytes at offset {offset} leaves the buffer of "
                          f"{self.size} bytes")
        flat = torch.frombuffer(self._shm.buf, dtype=torch.uint8, count=n, offset=offset)
        return flat.view(dtype).view(*shape)

    def close(self):
        """Unregisters (if registered) and unlinks the region; idempotent."""
        if self._shm is None:
            return
        if self._client is not None:
            try:
                self._client.unregister_buffer(self.name)
            except Error as e:
                if e.code != grpc.StatusCode.NOT_FOUND:
                    raise
            self._client = None
        shm, self._shm = self._shm, None
        try:
            shm.close()
        finally:
            shm.unlink()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"ShmBuffer(name={self.name!r}, shm_name={self.shm_name!r}, size={self.size})"


class CudaBuffer:
    """A contiguous torch CUDA tensor shared with ropekvd by its CUDA IPC handle.

    The daemon opens the handle (torch's caching allocator shares whole blocks; the tensor's
    offset inside its block is sent along) and copies straight into or out of the tensor. The
    tensor must stay alive while it is registered. `device` is the CUDA ordinal as the daemon
    numbers devices (default: the tensor's index, right when both see the same devices).
    """

    def __init__(self, tensor, name=None, device=None):
        import torch

        if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cuda":
            raise invalid("a CudaBuffer needs a torch CUDA tensor")
        if not tensor.is_contiguous():
            raise invalid("a CudaBuffer needs a contiguous tensor")
        storage = tensor.untyped_storage()
        shared = storage._share_cuda_()
        # (device, handle, storage bytes, storage offset in its block, ref counter handle,
        #  ref counter offset, event handle, event sync required)
        self.handle = ipc_mem_handle(shared[1])
        self.offset = int(shared[3]) + tensor.storage_offset() * tensor.element_size()
        self.size = tensor.numel() * tensor.element_size()
        self.device = tensor.device.index if device is None else int(device)
        self.tensor = tensor
        self.name = name or f"cuda-{os.getpid()}-{secrets.token_hex(6)}"
        self.paged_blocks = None  # pages per pool when registered with a paged layout
        self._client = None

    def array(self, dtype, shape, offset=0):
        """A torch view of the tensor's bytes: `shape` of torch `dtype` from byte `offset`."""
        import torch

        item = torch.empty((), dtype=dtype).element_size()
        n = int(np.prod(shape)) * item
        if offset < 0 or offset + n > self.size:
            raise invalid(f"a view of {n} bytes at offset {offset} leaves the buffer of "
                          f"{self.size} bytes")
        flat = self.tensor.reshape(-1).view(torch.uint8)[offset:offset + n]
        return flat.view(dtype).view(*shape)

    def synchronize(self):
        """Waits for the frontend's pending work on the tensor's device (before the daemon
        touches the memory from its own stream)."""
        import torch

        torch.cuda.current_stream(self.tensor.device).synchronize()

    def close(self):
        if self._client is not None:
            try:
                self._client.unregister_buffer(self.name)
            except Error as e:
                if e.code != grpc.StatusCode.NOT_FOUND:
                    raise
            self._client = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def ipc_mem_handle(handle):
    """The 64 bytes of the cudaIpcMemHandle_t in what torch's _share_cuda_() gives: the raw handle
    (older torch), or c10's versioned shareable handle [version][type][payload] (torch >= 2.3 or
    so), where type b"c" (a cudaMalloc block) is followed by the handle. Type b"e" (expandable
    segments, PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True) is no cudaIpcMemHandle_t: refused."""
    h = bytes(handle)
    if len(h) == 64:
        return h
    if len(h) == 66 and h[1:2] == b"c":
        return h[2:]
    if len(h) >= 2 and h[1:2] == b"e":
        raise invalid("the tensor lives in an expandable segment of torch's allocator, which CUDA "
                      "IPC handles cannot share; allocate it with expandable_segments off")
    raise invalid(f"torch gave a CUDA IPC handle of {len(h)} bytes in an unknown format")


def resolve_out(out):
    """(buffer, offset) of an `out=` argument that names a registered buffer, else None."""
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], (ShmBuffer, CudaBuffer)):
        buffer, offset = out
    elif isinstance(out, (ShmBuffer, CudaBuffer)):
        buffer, offset = out, 0
    else:
        return None
    if buffer._client is None:
        raise Error(grpc.StatusCode.FAILED_PRECONDITION,
                    f"buffer {buffer.name!r} is not registered (client.register_shm / "
                    "register_cuda)")
    offset = int(offset)
    if offset < 0:
        raise invalid(f"offset must be >= 0, got {offset}")
    return buffer, offset


def buffer_range(buffer, offset=0, length=0, block_ids=None):
    """A BufferRange: [offset, offset + length) of a buffer, or its pages `block_ids`."""
    _need_dataplane()
    r = dpb.BufferRange(buffer=buffer.name if not isinstance(buffer, str) else buffer,
                        offset=int(offset), length=int(length))
    if block_ids is not None:
        if int(offset) != 0:
            raise invalid("give block_ids or an offset, not both")
        r.block_ids.extend(int(i) for i in block_ids)
    return r


def set_paged(req, paged):
    """Sets RegisterBufferRequest.paged from (model, num_blocks), or leaves it unset for None."""
    if paged is None:
        return
    model, num_blocks = paged
    req.paged.model = str(model)
    req.paged.num_blocks = int(num_blocks)


def paged_shape(spec, num_blocks):
    """The shape of a paged pool: [layers, 2, num_blocks, block_tokens, kv_heads, head_dim]."""
    if not num_blocks:
        raise invalid("the buffer was not registered with a paged layout (paged=)")
    return (spec.layers, 2, int(num_blocks), spec.block_tokens, spec.kv_heads, spec.head_dim)


def view(buffer, offset, np_dtype, torch_dtype, shape):
    """The answer in the buffer: numpy for shared memory, torch for a CUDA tensor."""
    if isinstance(buffer, CudaBuffer):
        return buffer.array(torch_dtype(), shape, offset)
    return buffer.array(np_dtype, shape, offset)


def torch_dtype_of(dtype):
    """A thunk giving the torch dtype of a proto DType (torch imported only when called)."""
    def get():
        import torch

        from ropekv._pb import pb

        return {pb.DTYPE_F32: torch.float32, pb.DTYPE_F16: torch.float16,
                pb.DTYPE_BF16: torch.bfloat16}[dtype]
    return get


def is_buffer(x):
    return isinstance(x, (ShmBuffer, CudaBuffer))


__all__ = ["ShmBuffer", "CudaBuffer"]
