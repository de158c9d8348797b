"""One copy of a frozen base model per machine, however many local workers train on it.

A base model stored as float32 safetensors is already one copy: transformers memory-maps the
file, and the workers share its pages through the page cache. A base stored in bfloat16 or
float16 (most checkpoints on the Hub) is converted on loading, so every data-parallel worker
held its own float32 copy of weights that never change (8 workers of a 1B model: ~35 GB). For
those the first worker writes the loaded float32 weights once to `<qlorax home>/shared-weights/`
(safetensors, named by the base model's content digest and the torch version), and every
worker then swaps its frozen parameters for read-only views of that file, memory-mapped
copy-on-write: the page cache holds one copy, which the kernel shares between the workers
(PSS counts it once), and a write could only ever change the writer's private page, never the
file. A worker first checks that the file holds exactly the bits it loaded itself, so sharing
cannot change a result: a file that differs (another library version's conversion, a damaged
cache) is rewritten.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import gc
import json
import os
import struct
from pathlib import Path
from typing import Any

from qlorax.settings import qlorax_home

SHARED_DIR = "shared-weights"


def _tensor_entries(path: Path) -> tuple[int, dict[str, Any]]:
    """A safetensors file's header size and its tensors' entries (dtype, shape, data_offsets)."""
    with path.open("rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_size))
    return header_size, {name: entry for name, entry in header.items() if name != "__metadata__"}


def stored_as_float32(model_dir: Path) -> bool:
    """Whether every weight of the model directory is float32 safetensors (memory-mapped as is)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    return bool(files) and all(entry["dtype"] == "F32" for path in files
                               for entry in _tensor_entries(path)[1].values())


def _return_freed_memory() -> None:
    """Give the freed private copy back to the operating system: glibc keeps large freed
    blocks in the process (measured: 727 MB still private after SmolLM2's copy was dropped,
    313 MB after malloc_trim)."""
    gc.collect()
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def shared_weights_path(base_digest: str) -> Path:
    import torch

    version = torch.__version__.split("+")[0]
    return qlorax_home() / SHARED_DIR / f"{base_digest[:32]}-torch{version}-float32.safetensors"


def base_float32_parameters(model: Any) -> dict[str, Any]:
    """The base model's parameters that sharing covers (called before the LoRA wrap, which
    freezes them all): float32 plain tensors (a 4-bit layer's packed weights are not); tied
    weights once."""
    import torch

    return {name: param for name, param in model.named_parameters()
            if param.dtype == torch.float32 and type(param.data) is torch.Tensor}


def _write(path: Path, tensors: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        save_file({name: tensor.detach().contiguous() for name, tensor in tensors.items()}, str(partial))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)  # a full disk leaves no half-written copy behind


def map_file(path: Path) -> dict[str, Any]:
    """Every tensor of a float32 safetensors file as a view of one copy-on-write mapping of it."""
    import torch

    header_size, entries = _tensor_entries(path)
    mapped = torch.from_file(str(path), shared=False, size=path.stat().st_size, dtype=torch.uint8)
    start = 8 + header_size
    views = {}
    for name, entry in entries.items():
        if entry["dtype"] != "F32":
            raise ValueError(f"{path}: {name} is {entry['dtype']}, not F32")
        begin, end = entry["data_offsets"]
        views[name] = mapped[start + begin:start + end].view(torch.float32).view(entry["shape"])
    return views


def share_base_weights(model: Any, base_digest: str) -> int:
    """Swap the base model's float32 parameters for views of the machine's shared copy
    (written by the first worker to get here); returns the bytes now shared. Call it before
    the LoRA wrap: the base is frozen from then on."""
    import torch

    params = base_float32_parameters(model)
    if not params:
        return 0
    path = shared_weights_path(base_digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one writer; the others wait and then map what it wrote
        views = map_file(path) if path.is_file() else {}
        if views.keys() != params.keys() or not all(torch.equal(views[name], param) for name, param in params.items()):
            _write(path, params)
            views = map_file(path)
    with torch.no_grad():
        for name, param in params.items():
            param.data = views[name]
    del params
    _return_freed_memory()
    return sum(view.numel() * 4 for view in views.values())
