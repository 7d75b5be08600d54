"""The pipeline components a worker holds, shared by identity between the variants it hosts.

A component's identity is (source, component, dtype, device): the text encoders, tokenizers
and VAE of a model are loaded once however many of its variants are resident, and each
variant holds its own denoiser. A component lives while a resident variant uses it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["Components", "Identity", "estimate_bytes", "module_bytes"]

# safetensors dtypes -> bytes per element (the header names them)
_ELEMENT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2}
_ELEMENT_BYTES |= {"I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_FLOAT = {"F64", "F32", "F16", "BF16"}
_DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


@dataclass(frozen=True)
class Identity:
    source: str  # the folder (or hub id) the component was loaded from
    component: str  # its name in the pipeline: "text_encoder", "vae", "unet", ...
    dtype: str
    device: str


@dataclass
class _Held:
    module: object
    bytes: int
    users: set[str] = field(default_factory=set)


class Components:
    """Modules by identity, each with the variants that use it."""

    def __init__(self) -> None:
        self._held: dict[Identity, _Held] = {}

    def get(self, identity: Identity) -> object | None:
        held = self._held.get(identity)
        return None if held is None else held.module

    def hold(self, identity: Identity, module: object, user: str) -> None:
        """``user`` (a variant) uses ``module`` as ``identity``: the first holder's module is
        the one kept."""
        held = self._held.setdefault(identity, _Held(module, module_bytes(module)))
        held.users.add(user)

    def release(self, user: str) -> list[Identity]:
        """``user`` no longer uses anything; the identities dropped because nobody does."""
        dropped = []
        for identity, held in list(self._held.items()):
            held.users.discard(user)
            if not held.users:
                del self._held[identity]
                dropped.append(identity)
        return dropped

    def bytes(self) -> dict[Identity, int]:
        return {identity: held.bytes for identity, held in self._held.items()}

    def total(self) -> int:
        return sum(held.bytes for held in self._held.values())

    def users(self, identity: Identity) -> set[str]:
        held = self._held.get(identity)
        return set() if held is None else set(held.users)


def module_bytes(module: object) -> int:
    """Bytes of a module's parameters and buffers (0 for a tokenizer or a scheduler), each
    tensor once (a tied weight has two names). A quantized tensor subclass counts its own
    data: its storage, not a float view of it."""
    if not isinstance(module, torch.nn.Module):
        return 0
    seen: set[tuple[int, int]] = set()
    return sum(_tensor_bytes(t, seen) for t in module.state_dict(keep_vars=True).values())


def _tensor_bytes(tensor: torch.Tensor, seen: set[tuple[int, int]]) -> int:
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(
        tensor, "__tensor_flatten__"
    ):
        names, _ = tensor.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(tensor, n), seen) for n in names)
    nbytes = tensor.numel() * tensor.element_size()
    key = (tensor.data_ptr(), nbytes)
    if nbytes and key in seen:
        return 0
    seen.add(key)
    return nbytes


def estimate_bytes(folder: Path, dtype: str) -> int | None:
    """Bytes a component folder's safetensors weights take once loaded as ``dtype`` (float
    tensors converted, others as stored), read from the files' headers without loading
    them; None when the folder has no safetensors file (its size is then learnt by loading)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    per_float = _DTYPE_BYTES[dtype]
    total = 0
    for file in files:
        with file.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for dim in info["shape"]:
                count *= dim
            kind = info["dtype"]
            total += count * (per_float if kind in _FLOAT else _ELEMENT_BYTES.get(kind, 4))
    return total
