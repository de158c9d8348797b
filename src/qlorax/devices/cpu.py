"""The CPU: the device every profile trains on today."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qlorax import settings
from qlorax.cpuid import processor_facts
from qlorax.devices.base import ProcessorCheck


@dataclass(frozen=True)
class CpuDevice:
    name: str = "cpu"
    environment: Mapping[str, str] = field(default_factory=lambda: {"CUDA_VISIBLE_DEVICES": ""})
    distributed_backend: str = "gloo"

    def placement(self) -> dict[str, Any]:
        return {"device_map": {"": "cpu"}}

    def tensor_bytes(self, tensor: Any) -> bytes:
        return tensor.detach().contiguous().numpy().tobytes()

    def rng_state(self) -> dict[str, Any]:
        import torch

        return {"rng.torch": torch.get_rng_state()}

    def restore_rng_state(self, tensors: Mapping[str, Any]) -> None:
        import torch

        torch.set_rng_state(tensors["rng.torch"])

    def unsupported(self, profile: ProcessorCheck) -> tuple[str | None, dict[str, Any]]:
        """Judged from CPUID before torch loads, so a refused processor never trains silently
        (CPUID answers for an emulated processor too; /proc/cpuinfo would be the host's)."""
        cpu = processor_facts(settings.emulated_cpu())
        return profile.unsupported_cpu(cpu), cpu


CPU = CpuDevice()
