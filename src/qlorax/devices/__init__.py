"""The devices a run can train on, by name: `cpu` today.

Every assumption about where tensors live goes through the device a profile names: the
environment pinned before torch loads, how the base model is placed, how tensor bytes are
read for digests, which random-number states a checkpoint keeps, the torch.distributed
backend, and which processors the promise refuses. A CUDA device would be one module here
(devices/cuda.py) plus one profile entry in qlorax.profiles naming it.
"""

from __future__ import annotations

from qlorax.devices import cpu
from qlorax.devices.base import Device
from qlorax.errors import ConfigError

DEVICES: dict[str, Device] = {"cpu": cpu.CPU}
DEFAULT_DEVICE = "cpu"


def get_device(name: str = DEFAULT_DEVICE) -> Device:
    """The registered device called `name` (exit 2 naming the choices otherwise)."""
    try:
        return DEVICES[name]
    except KeyError:
        raise ConfigError(f"device {name!r}: expected one of {', '.join(DEVICES)}") from None


__all__ = ["DEFAULT_DEVICE", "DEVICES", "Device", "get_device"]
