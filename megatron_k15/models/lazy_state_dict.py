"""State dicts whose tensors are read only when asked for, so checkpoint tools hold one layer at a time.

A 72B model is 145 GB in bf16, DeepSeek-V3 and Kimi K2 over a terabyte: a converter that loads
every tensor before it writes anything needs several times that in host memory. A
``LazyStateDict`` maps each name to a function that produces the tensor (a read from a
safetensors file, a slice of a memory-mapped shard, a dequantization); renaming, filtering
and transforming it build new loaders without reading anything. A reader that asks for one
layer's names gets that layer, and nothing keeps it alive after the caller drops it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Callable, Iterator

import torch

Loader = Callable[[], torch.Tensor]


class LazyStateDict(Mapping):
    """name -> tensor, each produced by its loader on access (not cached)."""

    def __init__(self, loaders: dict[str, Loader]):
        self._loaders = loaders

    @classmethod
    def view(cls, source: Mapping, names: dict[str, str]) -> "LazyStateDict":
        """{new name: source[old name]} for ``names`` = {new: old}, read on access."""
        return cls({new: (lambda old=old: source[old]) for new, old in names.items()})

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._loaders[name]()

    def __contains__(self, name) -> bool:
        return name in self._loaders

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)


def meta_state_dict(sd: Mapping) -> LazyStateDict:
    """``sd`` as tensors on the meta device (shape and dtype, no data): running a conversion on
    it checks every name and shape in a moment, before any tensor is read."""
    if isinstance(sd, SafetensorsFiles):
        return sd.meta()
    return LazyStateDict({name: (lambda n=name: torch.empty_like(sd[n], device="meta")) for name in sd})


# safetensors' dtype names
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
    "C64": torch.complex64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}


class SafetensorsFiles(LazyStateDict):
    """The tensors of one or more safetensors files, read one by one. Files are opened once and
    memory-mapped: a tensor's pages are the file's (the kernel may drop them), so a tensor is
    read-only to callers (writes would stay in this process's copy of the mapping)."""

    def __init__(self, paths: list[str]):
        from safetensors import safe_open

        self._handles = {}
        loaders = {}
        for path in paths:
            handle = self._handles[path] = safe_open(path, framework="pt")
            for name in handle.keys():
                loaders[name] = (lambda h=handle, n=name: h.get_tensor(n))
        super().__init__(loaders)

    def meta(self) -> LazyStateDict:
        """Shapes and dtypes from the files' headers, as meta tensors."""
        def meta_tensor(path, handle, name):
            info = handle.get_slice(name)
            code = info.get_dtype()
            if code not in SAFETENSORS_DTYPES:
                raise ValueError(f"{path}: tensor {name!r} has dtype {code}, which torch cannot hold")
            return torch.empty(info.get_shape(), dtype=SAFETENSORS_DTYPES[code], device="meta")

        return LazyStateDict({name: (lambda p=path, h=handle, n=name: meta_tensor(p, h, n))
                              for path, handle in self._handles.items() for name in handle.keys()})


def safetensors_index_files(index_path: str) -> list[str]:
    """The shard files an ``*.safetensors.index.json`` names, in order, as paths."""
    with open(index_path) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    return [os.path.join(os.path.dirname(index_path), name) for name in files]


def load_torch_file(path: str) -> dict:
    """``torch.load`` memory-mapped where the file allows (torch's zip format: tensors are read
    from disk as they are touched), fully read otherwise (the legacy format)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        return torch.load(path, map_location="cpu", weights_only=True)
