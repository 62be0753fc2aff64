"""KV arrays: numpy dtypes of the model dtypes, shape checks, torch tensors in and out.

KV of n blocks is an array [blocks][layers][k|v][kv_heads][block_tokens][head_dim] in the model's
dtype, C-contiguous, little-endian: exactly the bytes ropekvd stores. bf16 travels as
ml_dtypes.bfloat16 when ml_dtypes is installed, else as its raw bits in uint16 (int16 is
accepted too); torch.bfloat16 tensors are accepted and returned by the torch helpers.
torch is imported lazily: this module works without it.
"""

import sys

import numpy as np

from ropekv._pb import pb
from ropekv.errors import invalid

try:  # optional: a real bfloat16 numpy dtype
    import ml_dtypes as _ml_dtypes

    _BF16 = np.dtype(_ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - depends on the machine
    _BF16 = None

_ITEM = {pb.DTYPE_F32: 4, pb.DTYPE_F16: 2, pb.DTYPE_BF16: 2}
_NAME = {pb.DTYPE_F32: "f32", pb.DTYPE_F16: "f16", pb.DTYPE_BF16: "bf16"}


def numpy_dtype(dtype):
    """The numpy dtype that get() returns for a proto DType: float32, float16, and for bf16
    ml_dtypes.bfloat16 if installed else uint16 (the raw bits)."""
    if dtype == pb.DTYPE_F32:
        return np.dtype(np.float32)
    if dtype == pb.DTYPE_F16:
        return np.dtype(np.float16)
    if dtype == pb.DTYPE_BF16:
        return _BF16 if _BF16 is not None else np.dtype(np.uint16)
    raise invalid(f"dtype must be DTYPE_F32, DTYPE_F16 or DTYPE_BF16, got {dtype}")


def block_bytes(spec):
    """Bytes of one block of a ModelSpec."""
    return spec.layers * 2 * spec.kv_heads * spec.block_tokens * spec.head_dim * _ITEM[spec.dtype]


def kv_shape(spec, blocks):
    """The array shape of `blocks` blocks of a ModelSpec:
    (blocks, layers, 2, kv_heads, block_tokens, head_dim)."""
    return (blocks, spec.layers, 2, spec.kv_heads, spec.block_tokens, spec.head_dim)


def _accepts(np_dtype, dtype):
    if dtype == pb.DTYPE_F32:
        return np_dtype == np.float32
    if dtype == pb.DTYPE_F16:
        return np_dtype == np.float16
    return np_dtype in (np.dtype(np.uint16), np.dtype(np.int16)) or np_dtype.name == "bfloat16"


def is_torch_tensor(x):
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def torch_to_numpy(t):
    """A CPU numpy view of a torch tensor (copied to the host if it lives on a GPU); bf16 as
    uint16 bits."""
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def numpy_to_torch(a, dtype, device=None):
    """A torch tensor of a get() array (shares memory when device is None / cpu)."""
    import torch

    if dtype == pb.DTYPE_BF16:
        t = torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(np.ascontiguousarray(a))
    if device is not None and str(device) != "cpu":
        t = t.to(device)
    return t


def kv_bytes(kv, spec):
    """(a flat uint8 view of the KV bytes, blocks) of an array, tensor or bytes-like object, checked
    against the model. Raises ropekv.Error(INVALID_ARGUMENT) naming expected vs got."""
    bb = block_bytes(spec)
    if is_torch_tensor(kv):
        kv = torch_to_numpy(kv)
    if isinstance(kv, np.ndarray):
        if not _accepts(kv.dtype, spec.dtype):
            want = {pb.DTYPE_F32: "float32", pb.DTYPE_F16: "float16",
                    pb.DTYPE_BF16: "bfloat16 / uint16 / int16"}[spec.dtype]
            raise invalid(f"KV of a {_NAME[spec.dtype]} model must be {want}, got {kv.dtype}")
        if kv.ndim != 6 or tuple(kv.shape[1:]) != kv_shape(spec, 0)[1:]:
            raise invalid(
                "KV must be [blocks, layers, 2, kv_heads, block_tokens, head_dim] = "
                f"[n, {', '.join(str(d) for d in kv_shape(spec, 0)[1:])}], got {list(kv.shape)}")
        if kv.dtype.byteorder == ">":
            raise invalid("KV must be little-endian, got a big-endian array")
        kv = np.ascontiguousarray(kv)
        return kv.reshape(-1).view(np.uint8), kv.shape[0]
    try:
        view = np.frombuffer(kv, dtype=np.uint8)
    except TypeError:
        raise invalid(f"KV must be a numpy array, a torch tensor or bytes, got {type(kv).__name__}")
    if view.size == 0 or view.size % bb != 0:
        raise invalid(f"KV bytes must be a positive multiple of the block size {bb}, got {view.size}")
    return view, view.size // bb


def tokens_list(tokens):
    """A list of Python ints from a list, tuple, numpy array or torch tensor (1-D, or [1, n])."""
    if is_torch_tensor(tokens):
        tokens = tokens.detach().cpu().reshape(-1).tolist()
    elif isinstance(tokens, np.ndarray):
        tokens = tokens.reshape(-1).tolist()
    else:
        tokens = [int(t) for t in tokens]
    for t in tokens:
        if t < -(1 << 31) or t >= (1 << 31):
            raise invalid(f"tokens must fit int32, got {t}")
    return tokens


def hash_bytes(h):
    """A block hash as bytes: given as bytes, or as 64 hex digits."""
    if isinstance(h, str):
        try:
            h = bytes.fromhex(h)
        except ValueError:
            raise invalid(f"a block hash in hex has 64 hex digits, got {h!r}") from None
    return bytes(h)
