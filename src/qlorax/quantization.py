"""QLoRA: a 4-bit (bitsandbytes) base model under float32 LoRA weights.

The quantized weights are computed from the base model's float weights when it loads, by
bitsandbytes. Their bits are therefore a function of the bitsandbytes version as much as of
the model: `quantized_base_digest` names them (packed 4-bit data plus every piece of quant
state), and the training run records that digest in env.json's fingerprint, so a
bitsandbytes packing change shows up as environment drift rather than as nondeterminism.

Imports torch, transformers and bitsandbytes only inside functions (the CLI stays light).
"""

from __future__ import annotations

import hashlib
from typing import Any

from qlorax.config import ModelSection
from qlorax.errors import EXIT_RESOURCES, ConfigError, ModelError


def is_quantized(section: ModelSection) -> bool:
    return section.quantization != "none"


def bitsandbytes_config(section: ModelSection) -> Any:
    """The transformers BitsAndBytesConfig for `model.quantization` (4-bit only)."""
    import torch
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401 - only to say clearly that it is missing
    except ImportError:
        raise ConfigError(
            f"model.quantization: {section.quantization} needs the bitsandbytes package, which is not installed; "
            "install it (pip install bitsandbytes) or set model.quantization to none"
        ) from None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=section.quantization,
        bnb_4bit_use_double_quant=section.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, section.compute_dtype),
        bnb_4bit_quant_storage=torch.uint8,
    )


# bitsandbytes' CPU backend repacks 4-bit weights in blocks of this many output rows on a
# processor with AVX512-BF16 (for its no-grad forward, so every evaluation), and fails on a
# layer whose output size does not divide ("N must be divisible by block_n").
BNB_CPU_PACK_ROWS = 32


def packs_4bit_weights_here() -> bool:
    """Whether this processor takes bitsandbytes' repacking path (AVX512-BF16)."""
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def refuse_unpackable_layers(model: Any, name: str) -> None:
    """Before anything trains: on a processor where bitsandbytes repacks 4-bit weights, a layer
    it cannot repack would crash the first evaluation; say so in one paragraph (exit 3: this
    processor and library, not the config, are the cause)."""
    import bitsandbytes as bnb

    if not packs_4bit_weights_here():
        return
    bad = sorted({f"{path.rsplit('.', 1)[-1]} ({module.out_features})" for path, module in model.named_modules()
                  if isinstance(module, bnb.nn.Linear4bit) and module.out_features % BNB_CPU_PACK_ROWS})
    if bad:
        raise ModelError(f"model.quantization: {name} cannot be trained in 4 bits on this processor: it has "
                         f"AVX512-BF16, where bitsandbytes repacks 4-bit weights in blocks of {BNB_CPU_PACK_ROWS} "
                         f"output rows, and these layers' output sizes do not divide: {', '.join(bad)}. Train it "
                         "without quantization (model.quantization=none), or on a processor without AVX512-BF16.",
                         exit_code=EXIT_RESOURCES)


def prepare_for_training(model: Any, section: ModelSection) -> Any:
    """A 4-bit base goes through PEFT's k-bit preparation (freezes it, upcasts half-precision
    non-quantized weights to float32); any base gets gradient checkpointing if asked (its bits
    equal the run without, measured; non-reentrant, so no input-grad hook). A float32 base
    without checkpointing is returned untouched, so existing runs keep their bits."""
    checkpointing_kwargs = {"use_reentrant": False}
    if is_quantized(section):
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=section.gradient_checkpointing,
                                               gradient_checkpointing_kwargs=checkpointing_kwargs)
    if section.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)
    return model


def _update_with_value(digest: Any, key: str, value: Any) -> None:
    import torch

    digest.update(key.encode())
    if isinstance(value, torch.Tensor):
        tensor = value.detach().contiguous().cpu()
        digest.update(f"{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    else:
        digest.update(repr(value).encode())


def quantized_base_digest(model: Any) -> str | None:
    """SHA-256 over every 4-bit layer's packed weight and its quant state (absmax, quant
    map, block size, nested statistics, ...), in module-name order; None when no layer is
    quantized. Independent of LoRA wrapping (PEFT's `base_layer.` is left out of names)."""
    import torch

    digest, found = hashlib.sha256(), False
    layers = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None and isinstance(weight, torch.Tensor):
            layers.append((name.replace(".base_layer", "").removeprefix("base_model.model."), weight, state))
    for name, weight, state in sorted(layers, key=lambda item: item[0]):
        found = True
        _update_with_value(digest, f"{name}.weight", weight)
        for key, value in sorted(state.as_dict(packed=False).items()):
            _update_with_value(digest, f"{name}.{key}", value)
    return digest.hexdigest() if found else None
