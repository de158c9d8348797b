"""Adapter tensors: which differ between two runs, and by how many units in the last place.

Read with `safetensors.numpy` (no torch); ULP distances are computed on integers ordered like
the floats, so one flipped low bit reads as 1 ULP however large the value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _ordered_bits(array: np.ndarray) -> np.ndarray | None:
    """Integers that are ordered like the floats, so that their difference counts ULPs.

    float32/float16: view as signed int and turn sign-magnitude into two's complement
    (negative i -> INT_MIN - i), computed in int64 so nothing overflows. float64: the same
    order as unsigned offsets.
    """
    if array.dtype == np.float32 or array.dtype == np.float16:
        width = 32 if array.dtype == np.float32 else 16
        signed = array.view(np.int32 if width == 32 else np.int16).astype(np.int64)
        return np.where(signed < 0, np.int64(-(2 ** (width - 1))) - signed, signed)
    if array.dtype == np.float64:
        raw = array.view(np.uint64)
        sign = np.uint64(1 << 63)
        return np.where(raw & sign, ~raw, raw | sign)
    return None


def ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise distance in units in the last place (+0 and -0 are 0 apart)."""
    oa, ob = _ordered_bits(np.ascontiguousarray(a)), _ordered_bits(np.ascontiguousarray(b))
    if oa is None or ob is None:
        return np.abs(a.astype(np.float64) - b.astype(np.float64))
    if oa.dtype == np.uint64:
        return np.where(oa > ob, oa - ob, ob - oa)
    return np.abs(oa - ob)


def _tensor_diff(name: str, a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """Stats for two same-shape, same-dtype tensors whose bytes differ (so size > 0)."""
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    abs_diff = np.abs(a64 - b64)
    denom = np.maximum(np.abs(a64), np.abs(b64))
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(denom > 0, abs_diff / np.where(denom > 0, denom, 1.0), 0.0)
    bits_differ = a.view(np.uint8).reshape(a.size, -1) != b.view(np.uint8).reshape(b.size, -1)
    return {
        "name": name,
        "shape": list(a.shape),
        "dtype": str(a.dtype),
        "numel": int(a.size),
        "differing_elements": int(np.count_nonzero(np.any(bits_differ, axis=1))),
        "max_abs_diff": float(np.max(abs_diff)),
        "max_rel_diff": float(np.max(rel)),
        "max_ulp_distance": int(np.max(ulp_distance(a, b))),
    }


def load_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as numpy arrays (imported lazily: analysis starts fast)."""
    from safetensors.numpy import load_file

    return load_file(str(path))


def compare_adapters(
    reference: dict[str, np.ndarray] | Path, run: dict[str, np.ndarray] | Path
) -> dict[str, Any]:
    """Which tensors differ between two adapters, how much (abs, rel, ULP), sorted by name.

    Tensors present on one side only are listed with `missing_in`; a shape mismatch is flagged
    per tensor and in `shapes_differ`.
    """
    ref = reference if isinstance(reference, dict) else load_tensors(Path(reference))
    other = run if isinstance(run, dict) else load_tensors(Path(run))
    tensors: list[dict[str, Any]] = []
    shapes_differ = False
    names = sorted(set(ref) | set(other))
    compared = len(names)  # tensors present on either side; a missing one counts as differing
    for name in names:
        if name not in other:
            tensors.append({"name": name, "missing_in": "run", "shape": list(ref[name].shape)})
            continue
        if name not in ref:
            tensors.append({"name": name, "missing_in": "reference", "shape": list(other[name].shape)})
            continue
        a, b = ref[name], other[name]
        if a.shape != b.shape:
            shapes_differ = True
            tensors.append({"name": name, "shape_mismatch": True, "shape_reference": list(a.shape),
                            "shape_run": list(b.shape)})
        elif a.dtype != b.dtype:
            tensors.append({"name": name, "dtype_mismatch": True, "dtype_reference": str(a.dtype),
                            "dtype_run": str(b.dtype), "shape": list(a.shape)})
        elif a.tobytes() != b.tobytes():
            tensors.append(_tensor_diff(name, a, b))
    return {"tensors": tensors, "tensors_compared": compared, "tensors_differing": len(tensors),
            "shapes_differ": shapes_differ}
