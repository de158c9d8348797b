"""Base models: presets, local directories, GGUF files and hub ids; loading; LoRA wrapping.

Presets (qlorax.model_presets) and GGUF files are materialised once into local Hugging Face
model directories and then loaded through the same `from_pretrained` path as any real
model. A base model is identified by its content digest (qlorax.identity), however it is named
(preset, directory, GGUF file); only a hub id is a name, pinned by its revision.
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
from qlorax.identity import (
    CONTENT_PREFIX,
    GGUF_SUFFIX,
    content_identity,
    directory_digest,
    file_digest,
    gguf_file_in,
    local_model_identity,
    model_content_digest,
    read_model_marker,
)
from qlorax.model_presets import (
    PRESETS,
    Preset,
    gguf_cache_dir,
    materialize_gguf,
    materialize_preset,
    preset_dir,
    preset_from_gguf,
    preset_with_content,
)


@dataclass
class BaseModelInfo:
    """Where a base model lives, the stable name runs record for it and its content digest
    (both deterministic: derived from the content, never from how the model was named), a
    preset's provenance, and what the model directory's qlorax marker says (informational)."""

    stable_id: str
    local_dir: Path
    digest: str
    provenance: dict[str, str] = field(default_factory=dict)
    marker_provenance: dict[str, str] = field(default_factory=dict)


def preset_named(name: str) -> Preset | None:
    """The preset `name` names: by its name, or by its content identity (`sha256:<digest>`, as a
    run's resolved_config.json records it, so that the recorded config trains again)."""
    if name in PRESETS:
        return PRESETS[name]
    return preset_with_content(name.removeprefix(CONTENT_PREFIX)) if name.startswith(CONTENT_PREFIX) else None


def local_model_dir(section: ModelSection) -> Path | None:
    """The local directory or GGUF file `model.name_or_path` names; None for a preset or a
    hub id. A path-like name that is missing or not a model is a ModelError. No torch, so the
    CLI can check before it launches a training process."""
    name = section.name_or_path
    if preset_named(name) is not None:
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
    """What the config hash records for the base model: `sha256:<content digest>` of its files
    however it is named — a preset (its pinned digest: known before it is built), a local
    directory, or the GGUF file a preset is built from. Another GGUF file is `gguf-sha256:` of
    its own bytes (its conversion is known only once converted, in the training process); a hub
    id keeps its name (its revision is in the config). A path that names no model keeps its name
    here; loading it fails with a clear error."""
    preset = preset_named(section.name_or_path)
    if preset is not None:
        return content_identity(preset.content_digest)
    try:
        local = local_model_dir(section)
    except ModelError:
        return section.name_or_path
    if local is None:
        return section.name_or_path
    gguf = gguf_file_in(local)
    converted_to = preset_from_gguf(file_digest(gguf)) if gguf is not None else None
    return content_identity(converted_to.content_digest) if converted_to else local_model_identity(local)


def model_cache_identity(section: ModelSection) -> str:
    """The base model's part of a cache key: its identity (`model_identity`: one content digest
    whatever the naming, so that a cache hit works across namings), or a hub id with its
    revision (and for a 4-bit base, the bitsandbytes version that quantizes it). No torch."""
    name = section.name_or_path
    hub = local_model_dir(section) is None and preset_named(name) is None
    identity = f"hub:{name}@{section.revision or 'main'}" if hub else model_identity(section)
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
    preset = preset_named(section.name_or_path)
    if preset is not None:
        return not (preset_dir(preset.name) / "config.json").is_file()
    local = local_model_dir(section)
    gguf = gguf_file_in(local) if local is not None else None
    return gguf is not None and not (gguf_cache_dir(gguf) / "config.json").is_file()


def resolve_base_model(section: ModelSection) -> BaseModelInfo:
    """Find the model's local directory (materialising a preset or converting a GGUF file),
    check that its content is the one the config hash names, and derive the stable name runs
    record for it from that content: a preset's name for a preset's bytes however they were
    named, a hub id for a hub model, else `local-sha256:<digest prefix>` (or
    `model.base_model_id` when set)."""
    name = section.name_or_path
    preset = preset_named(name)
    local = local_model_dir(section)
    hub = preset is None and local is None
    if preset is not None:
        local = materialize_preset(preset.name)
    elif local is not None:
        gguf = gguf_file_in(local)
        if gguf is not None:
            local = materialize_gguf(gguf)
    else:
        local = _hub_snapshot(name, section.revision)
    digest = model_content_digest(local)
    _check_content(section, local, digest)
    known = preset_with_content(digest)
    stable = section.base_model_id or (known.name if known else name if hub else f"local-sha256:{digest[:16]}")
    marker = read_model_marker(local)
    return BaseModelInfo(stable_id=stable, local_dir=local, digest=digest,
                         provenance=dict(known.provenance) if known else {},
                         marker_provenance=marker.provenance if marker else {})


def _check_content(section: ModelSection, local: Path, digest: str) -> None:
    """The bytes found are the ones the identity names: a preset (or the GGUF file of one) built
    by other library versions than the lock's, or changed since, would train under a config
    hash that names another model."""
    named = model_identity(section)
    if not named.startswith(CONTENT_PREFIX) or named == content_identity(digest):
        return
    expected = named.removeprefix(CONTENT_PREFIX)
    preset = preset_with_content(expected)
    what = f"the preset {preset.name}" if preset else "the model its identity names"
    raise ModelError(f"model.name_or_path: {section.name_or_path} built into {local} is not {what} (content digest "
                     f"{digest[:16]}…, expected {expected[:16]}…): it was built by library versions other than the "
                     f"lock's, or changed since. Remove {local} so that qlorax builds it again, or copy it elsewhere "
                     "and name that directory to train on it as it is")


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


def load_base_model(info: BaseModelInfo, section: ModelSection, device: Device = CPU, *,
                    exact_math: bool = False) -> tuple[Any, Any]:
    """Load tokenizer and model with from_pretrained, like any real model: float32, or with
    4-bit linear layers (bitsandbytes) when `model.quantization` asks; then prepared for
    training (PEFT's k-bit preparation for a 4-bit base, gradient checkpointing if configured).
    `exact_math` (the portable profile): the rotary module replaced by qlorax.exact_math's. SiLU
    and GELU modules are replaced by qlorax.activations' in every case."""
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
    if exact_math:
        from qlorax.exact_math import use_exact_rotary

        use_exact_rotary(model, section.name_or_path)
    from qlorax.activations import use_thread_free_activations

    use_thread_free_activations(model)  # the one-thread bits at any thread count (qlorax.activations)
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


def load_trained_model(run_dir: Path, section: ModelSection, base_digest: str, *,
                       exact_math: bool = False) -> tuple[Any, Any]:
    """A finished run's base model with its adapter attached (plain PEFT loading), in eval
    mode; (tokenizer, model). The base must be the one the run trained on: a base whose
    content digest differs from the recorded one is refused, since the adapter's output
    would then belong to neither."""
    from peft import PeftModel

    info = resolve_base_model(section)
    # Runs before the content digest recorded the digest of every file (README and marker too).
    if base_digest != info.digest and base_digest != directory_digest(info.local_dir):
        raise ModelError(f"model.name_or_path: the base model {section.name_or_path} (digest {info.digest[:16]}) is "
                         f"not the one {run_dir} trained on (digest {base_digest[:16]})")
    tokenizer, model = load_base_model(info, section, exact_math=exact_math)
    model = PeftModel.from_pretrained(model, run_dir, is_trainable=False)
    model.eval()
    return tokenizer, model
