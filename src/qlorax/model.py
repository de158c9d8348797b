"""Base models: presets, local directories, GGUF files and hub ids; loading; LoRA wrapping.

Presets (qlorax.model_presets) and GGUF files are materialised once into local Hugging Face
model directories and then loaded through the same `from_pretrained` path as any real
model. A local model is identified by its content digest (qlorax.identity), never its path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlorax import settings
from qlorax.config import LoraSection, ModelSection
from qlorax.devices.base import Device
from qlorax.devices.cpu import CPU
from qlorax.errors import ConfigError, ModelError, condense
from qlorax.identity import GGUF_SUFFIX, directory_digest, gguf_file_in, local_model_identity, read_model_marker
from qlorax.model_presets import PRESETS, gguf_cache_dir, materialize_gguf, materialize_preset, preset_dir


@dataclass
class BaseModelInfo:
    """Where a base model lives, the stable name runs record for it, its content digest, and
    (for models qlorax built) where its weights came from."""

    stable_id: str
    local_dir: Path
    digest: str
    provenance: dict[str, str] = field(default_factory=dict)


def local_model_dir(section: ModelSection) -> Path | None:
    """The local directory or GGUF file `model.name_or_path` names; None for a preset or a
    hub id. A path-like name that is missing or not a model is a ModelError. No torch, so the
    CLI can check before it launches a training process."""
    name = section.name_or_path
    if name in PRESETS:
        return None
    path = Path(name).expanduser()
    if path.exists():
        if gguf_file_in(path) is not None:
            return path
        if not (path / "config.json").is_file():
            raise ModelError(f"model.name_or_path: {name} is neither a Hugging Face model directory (no "
                             "config.json) nor a GGUF file (or a folder holding exactly one .gguf file)")
        return path
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or name.endswith(GGUF_SUFFIX):
        raise ModelError(f"model.name_or_path: the local model {name} does not exist")
    return None


def model_identity(section: ModelSection) -> str:
    """What the config hash records for the base model: a preset's or hub model's name, or
    the content digest of a local model — never its path. (A path that names no model keeps
    its name here; loading it fails with a clear error.)"""
    try:
        local = local_model_dir(section)
    except ModelError:
        return section.name_or_path
    return section.name_or_path if local is None else local_model_identity(local)


def model_cache_identity(section: ModelSection) -> str:
    """The base model's part of a cache key: a preset with its format version, a local
    model's content digest, or a hub id with its revision (and for a 4-bit base, the
    bitsandbytes version that quantizes it). No torch."""
    name = section.name_or_path
    local = local_model_dir(section)
    if name in PRESETS:
        identity = PRESETS[name].identity
    elif local is not None:
        identity = local_model_identity(local)
    else:
        identity = f"hub:{name}@{section.revision or 'main'}"
    if section.quantization != "none":  # bitsandbytes computes the 4-bit weights when the model loads
        from importlib.metadata import PackageNotFoundError, version

        try:
            identity += f"+bitsandbytes-{version('bitsandbytes')}"
        except PackageNotFoundError:
            pass
    return identity


def materialisation_pending(section: ModelSection) -> bool:
    """True when the base model is a preset or GGUF file not yet built into the model cache
    (so that parallel runs would each build it). No torch."""
    if section.name_or_path in PRESETS:
        return not (preset_dir(section.name_or_path) / "config.json").is_file()
    local = local_model_dir(section)
    gguf = gguf_file_in(local) if local is not None else None
    return gguf is not None and not (gguf_cache_dir(gguf) / "config.json").is_file()


def resolve_base_model(section: ModelSection) -> BaseModelInfo:
    """Find the model's local directory (materialising a preset or converting a GGUF file)
    and the stable name runs record for it."""
    name = section.name_or_path
    local = local_model_dir(section)
    provenance: dict[str, str] = {}
    if name in PRESETS:
        local = materialize_preset(name)
        stable = section.base_model_id or name
        provenance = dict(PRESETS[name].provenance)
    elif local is not None:
        gguf = gguf_file_in(local)
        if gguf is not None:
            local = materialize_gguf(gguf)
        marker = read_model_marker(local)
        content_id = f"local-sha256:{directory_digest(local)[:16]}"  # never the directory's name or path
        stable = section.base_model_id or (marker.stable_id if marker else content_id)
        provenance = marker.provenance if marker else {}
    else:
        local = _hub_snapshot(name, section.revision)
        stable = section.base_model_id or name
    return BaseModelInfo(stable_id=stable, local_dir=local, digest=directory_digest(local), provenance=provenance)


def _hub_snapshot(repo_id: str, revision: str | None) -> Path:
    """A hub model through the local cache; HF_HUB_OFFLINE=1 is honoured by huggingface_hub."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision,
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as exc:  # noqa: BLE001 - the hub raises many types; all mean "not available"
        offline = settings.hub_offline()
        why = "offline mode is on (HF_HUB_OFFLINE=1) and it is not in the local cache" if offline else (
            f"it could not be fetched ({type(exc).__name__})")
        raise ModelError(f"model.name_or_path: the hub model '{repo_id}' is not available: {why}") from None


def load_base_model(info: BaseModelInfo, section: ModelSection, device: Device = CPU) -> tuple[Any, Any]:
    """Load tokenizer and model with from_pretrained, like any real model: float32, or with
    4-bit linear layers (bitsandbytes) when `model.quantization` asks; then prepared for
    training (PEFT's k-bit preparation for a 4-bit base, gradient checkpointing if configured)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlorax.quantization import (
        bitsandbytes_config,
        is_quantized,
        prepare_for_training,
        refuse_unpackable_layers,
    )

    quantized = {"quantization_config": bitsandbytes_config(section), **device.placement()} if (
        is_quantized(section)) else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(info.local_dir)
    except Exception as exc:  # noqa: BLE001 - transformers and tokenizers raise many types for one cause
        missing = "" if (Path(info.local_dir) / "tokenizer.json").is_file() else " (it has no tokenizer.json)"
        raise ModelError(f"model.name_or_path: cannot build the tokenizer of {section.name_or_path}{missing}: "
                         f"{condense(str(exc), 120)}", detail=f"{type(exc).__name__}: {exc}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            info.local_dir, dtype=torch.float32, attn_implementation=section.attn_implementation, **quantized
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.name_or_path: cannot load {section.name_or_path}: {condense(str(exc))}",
                         detail=f"{type(exc).__name__}: {exc}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if is_quantized(section):
        refuse_unpackable_layers(model, section.name_or_path)
    return tokenizer, prepare_for_training(model, section)


def linear_module_names(model: Any) -> list[str]:
    """The distinct short names of the model's Linear layers (4-bit ones included): valid LoRA targets."""
    import torch

    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    return sorted(names)


def _targets(module_name: str, target_modules: list[str]) -> bool:
    """PEFT's rule for a list of names: the full name or its last components match."""
    return any(module_name == target or module_name.endswith(f".{target}") for target in target_modules)


def refuse_tied_targets(model: Any, target_modules: list[str]) -> None:
    """A LoRA on a module whose weight *is* the input embedding (tie_word_embeddings, as in
    SmolLM2's lm_head) would change the embeddings too once merged: refuse it. Checked by
    tensor identity, so a tie made any other way is caught as well."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    embedding_weight = getattr(embeddings, "weight", None)
    if embedding_weight is None:
        return
    tied = sorted(
        name for name, module in model.named_modules()
        if module is not embeddings and _targets(name, target_modules)
        and getattr(module, "weight", None) is embedding_weight
    )
    if tied:
        short = sorted({name.rsplit(".", 1)[-1] for name in tied})
        raise ConfigError(
            f"lora.target_modules: {', '.join(repr(m) for m in short)} shares its weight with the input embeddings "
            f"(the model ties them: tie_word_embeddings), so a LoRA on it would also change the embeddings once "
            f"merged into the base model; remove {', '.join(repr(m) for m in short)} from lora.target_modules"
        )


def wrap_with_lora(model: Any, section: LoraSection, init_seed: int, stable_id: str) -> Any:
    """Seed the LoRA-init stream, then wrap: PEFT draws lora_A from the global RNG. The LoRA
    weights are float32 whatever the base's dtype or quantization."""
    import torch
    from peft import LoraConfig, get_peft_model

    available = linear_module_names(model)
    missing = [name for name in section.target_modules if name not in available]
    if missing:
        raise ConfigError(
            f"lora.target_modules: the model has no module named {', '.join(repr(m) for m in missing)}; "
            f"its linear modules are: {', '.join(available)}"
        )
    refuse_tied_targets(model, list(section.target_modules))
    config = LoraConfig(
        r=section.r,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=list(section.target_modules),
        use_dora=section.use_dora,
        use_rslora=section.use_rslora,
        modules_to_save=list(section.modules_to_save) or None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(init_seed)
    peft_model = get_peft_model(model, config)  # autocast_adapter_dtype: LoRA weights in float32
    peft_model.peft_config["default"].base_model_name_or_path = stable_id
    return peft_model


def load_trained_model(run_dir: Path, section: ModelSection, base_digest: str) -> tuple[Any, Any]:
    """A finished run's base model with its adapter attached (plain PEFT loading), in eval
    mode; (tokenizer, model). The base must be the one the run trained on: a base whose
    content digest differs from the recorded one is refused, since the adapter's output
    would then belong to neither."""
    from peft import PeftModel

    info = resolve_base_model(section)
    if info.digest != base_digest:
        raise ModelError(f"model.name_or_path: the base model {section.name_or_path} (digest {info.digest[:16]}) is "
                         f"not the one {run_dir} trained on (digest {base_digest[:16]})")
    tokenizer, model = load_base_model(info, section)
    model = PeftModel.from_pretrained(model, run_dir, is_trainable=False)
    model.eval()
    return tokenizer, model
