"""What a device provides (qlorax.devices registers them). Torch is imported only inside the
methods, so a parent process can name a device without loading it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol


class ProcessorCheck(Protocol):
    """A profile's judgement of a processor (qlorax.profiles.Profile.unsupported_cpu)."""

    def unsupported_cpu(self, cpu: Mapping[str, Any]) -> str | None: ...


class Device(Protocol):
    name: str
    # Variables pinned before torch loads (e.g. CUDA_VISIBLE_DEVICES="" keeps a CPU run off GPUs).
    environment: Mapping[str, str]
    # torch.distributed backend of a data-parallel run on this device.
    distributed_backend: str

    def placement(self) -> dict[str, Any]:
        """from_pretrained keyword arguments that put a (quantized) base model on this device."""
        ...

    def tensor_bytes(self, tensor: Any) -> bytes:
        """A tensor's bytes as stored, for digests (copied to host memory where needed)."""
        ...

    def rng_state(self) -> dict[str, Any]:
        """This device's random-number states, as tensors a checkpoint keeps."""
        ...

    def restore_rng_state(self, tensors: Mapping[str, Any]) -> None:
        ...

    def unsupported(self, profile: ProcessorCheck) -> tuple[str | None, dict[str, Any]]:
        """(why the profile cannot keep its promise on this process's hardware or None, the facts)."""
        ...
