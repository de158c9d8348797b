"""Base models: the built-in tiny preset, local directories and hub ids; LoRA wrapping.

The preset is materialised once into a local Hugging Face model directory and then loaded
through the same `from_pretrained` path as any real model. Its weights come from numpy's
PCG64 generator (platform-independent bits) and its byte-level BPE tokenizer is trained
on the bundled corpus, so materialising it twice, anywhere, gives byte-identical files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlorax.artifacts import canonical_json, sha256_bytes, sha256_file
from qlorax.config import PRESET_MODEL, LoraSection, ModelSection
from qlorax.errors import ConfigError, ModelError

PRESET_SEED = 20261130
PRESET_SHAPE = {
    "vocab_size": 2048,
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
}
SPECIAL_TOKENS = {"bos": "<|bos|>", "eos": "<|eos|>", "pad": "<|pad|>"}
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|eos|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
PRESET_FORMAT_VERSION = "1"


@dataclass
class BaseModelInfo:
    """Where a base model lives and the stable name runs record for it."""

    stable_id: str
    local_dir: Path
    digest: str


def qlorax_home() -> Path:
    return Path(os.environ.get("QLORAX_HOME") or Path.home() / ".cache" / "qlorax")


def preset_dir() -> Path:
    return qlorax_home() / "models" / f"tiny-llama-v{PRESET_FORMAT_VERSION}"


def directory_digest(directory: Path) -> str:
    """SHA-256 over (relative path, file digest) of every file: one name for a model's bytes."""
    entries = {
        path.relative_to(directory).as_posix(): sha256_file(path)
        for path in sorted(directory.rglob("*"))
        if path.is_file() and not path.name.startswith(".")
    }
    return sha256_bytes(canonical_json(entries).encode())


def _preset_corpus() -> list[str]:
    from qlorax.data import bundled_path

    texts = []
    for name in ("reproducible_ml_alpaca.jsonl", "eval_prompts.jsonl"):
        for line in bundled_path(name).read_text(encoding="utf-8").splitlines():
            if line.strip():
                texts.extend(str(v) for v in json.loads(line).values() if isinstance(v, str))
    return texts


def _build_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    role_tokens = [f"<|{role}|>" for role in ("system", "user", "assistant")]
    trainer = trainers.BpeTrainer(
        vocab_size=PRESET_SHAPE["vocab_size"],
        special_tokens=[*SPECIAL_TOKENS.values(), *role_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_preset_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        model_max_length=PRESET_SHAPE["max_position_embeddings"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _preset_state(model: Any) -> dict[str, Any]:
    """Seeded weights: N(0, 0.02) for matrices, ones for norms, from per-tensor PCG64 streams."""
    import numpy as np
    import torch

    from qlorax.determinism import derive_seed

    state = {}
    for name, tensor in sorted(model.state_dict().items()):
        if name.endswith("norm.weight"):
            state[name] = torch.ones_like(tensor)
            continue
        rng = np.random.Generator(np.random.PCG64(derive_seed(PRESET_SEED, name)))
        values = rng.standard_normal(tuple(tensor.shape), dtype=np.float32) * np.float32(0.02)
        state[name] = torch.from_numpy(values)
    return state


def materialize_preset(target: Path | None = None) -> Path:
    """Write the tiny preset as a Hugging Face model directory (atomically; once)."""
    target = Path(target) if target is not None else preset_dir()
    if (target / "config.json").is_file():
        return target
    from transformers import LlamaConfig, LlamaForCausalLM

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer = _build_tokenizer()
        config = LlamaConfig(
            **{**PRESET_SHAPE, "vocab_size": len(tokenizer)},
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = LlamaForCausalLM(config)
        model.load_state_dict(_preset_state(model))
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race only if the winner finished
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def local_model_dir(section: ModelSection) -> Path | None:
    """The local directory `model.name_or_path` names, None for the preset or a hub id; a
    path-like name that is missing or not a model directory is a ModelError. No torch, so the
    CLI can check before it launches a training process."""
    name = section.name_or_path
    if name == PRESET_MODEL:
        return None
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"model.name_or_path: {name} is not a Hugging Face model directory (no config.json)")
        return path
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise ModelError(f"model.name_or_path: the local model directory {name} does not exist")
    return None


def resolve_base_model(section: ModelSection) -> BaseModelInfo:
    """Find the model's local directory (materialising the preset) and its stable name."""
    name = section.name_or_path
    local = local_model_dir(section)
    if name == PRESET_MODEL:
        local = materialize_preset()
        stable = section.base_model_id or PRESET_MODEL
    elif local is not None:
        stable = section.base_model_id or local.resolve().name
    else:
        local = _hub_snapshot(name, section.revision)
        stable = section.base_model_id or name
    return BaseModelInfo(stable_id=stable, local_dir=local, digest=directory_digest(local))


def _hub_snapshot(repo_id: str, revision: str | None) -> Path:
    """A hub model through the local cache; HF_HUB_OFFLINE=1 is honoured by huggingface_hub."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision,
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as exc:  # noqa: BLE001 - the hub raises many types; all mean "not available"
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        why = "offline mode is on (HF_HUB_OFFLINE=1) and it is not in the local cache" if offline else (
            f"it could not be fetched ({type(exc).__name__})")
        raise ModelError(f"model.name_or_path: the hub model '{repo_id}' is not available: {why}") from None


def load_base_model(info: BaseModelInfo, section: ModelSection) -> tuple[Any, Any]:
    """Load tokenizer and float32 model with from_pretrained, like any real model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(info.local_dir)
        model = AutoModelForCausalLM.from_pretrained(
            info.local_dir, dtype=torch.float32, attn_implementation=section.attn_implementation
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.name_or_path: cannot load {section.name_or_path}: {exc}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model


def linear_module_names(model: Any) -> list[str]:
    """The distinct short names of the model's Linear layers (valid LoRA targets)."""
    import torch

    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    return sorted(names)


def wrap_with_lora(model: Any, section: LoraSection, init_seed: int, stable_id: str) -> Any:
    """Seed the LoRA-init stream, then wrap: PEFT draws lora_A from the global RNG."""
    import torch
    from peft import LoraConfig, get_peft_model

    available = linear_module_names(model)
    missing = [name for name in section.target_modules if name not in available]
    if missing:
        raise ConfigError(
            f"lora.target_modules: the model has no module named {', '.join(repr(m) for m in missing)}; "
            f"its linear modules are: {', '.join(available)}"
        )
    config = LoraConfig(
        r=section.r,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=list(section.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(init_seed)
    peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = stable_id
    return peft_model
