"""The run config: one YAML file, validated by pydantic, with a canonical JSON form and hash.

Every key has a default, so a config file is optional. Unknown keys are errors (a typo
must never silently fall back to a default), and every error names the section and key.
The output directory and thread count are deliberately *not* part of the config: they
must not change the result, so they must not change the config hash either.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Protocol

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from qlorax.artifacts import canonical_json, sha256_bytes
from qlorax.config_hints import foreign_key_hint
from qlorax.errors import ConfigError
from qlorax.formats import DEFAULT_FORMAT, FILE_TYPES, FORMAT_NAMES, FORMATS
from qlorax.profiles import DEFAULT_PROFILE, PROFILES
from qlorax.strict_input import (
    TYPE_WORDS,
    load_yaml_unique,
    non_finite_keys,
    scalar_type,
    strict_scalar,
    type_word,
)

PRESET_MODEL = "qlorax/tiny-llama"
BUILTIN_DATA = "builtin:reproducible_ml_alpaca"


def added_in(schema: int) -> dict[str, Any]:
    """Field metadata for a key added in a later schema: `Field(default, json_schema_extra=added_in(2))`.
    Such a key is left out of the config hash while it holds its default."""
    return {"added_in_schema": schema}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_lossy_coercion(cls, value: Any, info: ValidationInfo) -> Any:
        """Strict scalars (pydantic's lax mode would turn `true` into 1 and `1` into true)."""
        field = cls.model_fields.get(info.field_name or "")
        expected = scalar_type(field.annotation) if field is not None else None
        if expected is None or value is None or strict_scalar(expected, value):
            return value
        if expected is int and isinstance(value, float) and not isinstance(value, bool):
            return value  # pydantic names the fraction ("got a number with a fractional part")
        raise PydanticCustomError("strict_type", "expected {expected}, got {got}",
                                  {"expected": TYPE_WORDS[expected], "got": type_word(value)})


class ModelSection(_Section):
    """The base model: the built-in preset, a local Hugging Face directory or a hub id."""

    name_or_path: str = Field(PRESET_MODEL, min_length=1)
    base_model_id: str | None = Field(
        None, description="Stable name written to adapter_config.json (default: preset name, hub id, "
        "or the local directory's name) so that runs on different machines stay identical."
    )
    revision: str | None = None
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    quantization: Literal["none", "nf4", "fp4"] = Field(
        "none", json_schema_extra=added_in(2), description="Load the base model's linear layers in 4 bits "
        "through bitsandbytes (QLoRA): nf4 or fp4; the LoRA weights stay float32."
    )
    double_quant: bool = Field(
        False, json_schema_extra=added_in(2), description="Quantize the 4-bit blocks' scales too (bitsandbytes "
        "double quantization): about 0.4 bits per weight less memory. Only with a quantization."
    )
    compute_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", json_schema_extra=added_in(2), description="The dtype the 4-bit layers dequantize to for "
        "their matmuls. Only with a quantization."
    )
    gradient_checkpointing: bool = Field(
        False, json_schema_extra=added_in(2), description="Recompute activations in the backward pass: lower "
        "peak memory, 15-35% slower on CPU (measured). Off unless memory requires it."
    )

    @model_validator(mode="after")
    def _quantization_options_need_a_quantization(self) -> ModelSection:
        if self.quantization == "none" and (self.double_quant or self.compute_dtype != "float32"):
            raise ValueError(
                "model.double_quant and model.compute_dtype apply only to a quantized base; set "
                "model.quantization to nf4 or fp4, or leave them at their defaults"
            )
        return self


class DataSection(_Section):
    """Training data: a JSONL, JSON, Parquet, Arrow or CSV file in one of the registered formats."""

    path: str = Field(BUILTIN_DATA, min_length=1)
    format: Literal[FORMAT_NAMES] = DEFAULT_FORMAT  # the registered formats (qlorax.formats)
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    max_length: int = Field(256, ge=8, le=8192)
    too_long: Literal["truncate", "reject"] = "truncate"
    train_on_inputs: bool = False
    allow_moving_ref: bool = Field(
        False, json_schema_extra=added_in(2), description="Let a git data source name a branch (or another "
        "ref that moves): the run trains on the commit it points to now and records that commit. Off: only a "
        "commit sha or a tag is accepted."
    )
    file_type: Literal[FILE_TYPES] = Field(
        "auto", json_schema_extra=added_in(2), description="How data.path is read: auto (by its extension: "
        ".jsonl, .json, .parquet, .arrow/.feather, .csv), jsonl, json, parquet, arrow (IPC) or csv."
    )
    columns: dict[str, str] = Field(
        default_factory=dict, json_schema_extra=added_in(2), description="The file's column for each field "
        "the format reads, where their names differ, e.g. {instruction: question, output: answer}."
    )

    @model_validator(mode="after")
    def _columns_are_format_fields(self) -> DataSection:
        fields = FORMATS[self.format].fields
        unknown = [key for key in self.columns if key not in fields]
        if unknown:
            raise ValueError(f"data.columns: {', '.join(map(repr, unknown))} is not a field of the {self.format} "
                             f"format; it reads {', '.join(fields)}")
        return self


class LoraSection(_Section):
    """LoRA adapter shape (PEFT LoraConfig)."""

    r: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: [
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"
        ],
        min_length=1,
    )
    use_dora: bool = Field(
        False, json_schema_extra=added_in(2), description="Weight-decomposed LoRA (PEFT `use_dora`): "
        "a learned magnitude per output feature on top of the low-rank update.")
    use_rslora: bool = Field(
        False, json_schema_extra=added_in(2), description="Rank-stabilised scaling alpha/sqrt(r) instead of "
        "alpha/r (PEFT `use_rslora`).")
    modules_to_save: list[str] = Field(
        default_factory=list, json_schema_extra=added_in(2), description="Modules trained in full and saved "
        "beside the adapter (PEFT `modules_to_save`), e.g. embed_tokens; not also in target_modules.")

    @model_validator(mode="after")
    def _saved_modules_are_not_targets(self) -> LoraSection:
        both = sorted(set(self.modules_to_save) & set(self.target_modules))
        if both:
            raise ValueError(f"lora.modules_to_save and lora.target_modules both name {', '.join(both)}; a module "
                             "is either trained in full or gets a LoRA adapter, not both")
        return self


class TrainingSection(_Section):
    """Optimisation: AdamW with a named transformers schedule, accumulation and clipping."""

    seed: int = Field(42, ge=0, le=2**32 - 1)
    max_steps: int | None = Field(
        40, ge=1, le=10_000_000, description="Optimizer steps to train; null when training.num_epochs is set "
        "(exactly one of the two).")
    num_epochs: float | None = Field(
        None, gt=0, le=100_000, json_schema_extra=added_in(2), description="Train for this many passes over "
        "the training split instead of max_steps: ceil(num_epochs * (train examples // batch_size) / "
        "gradient_accumulation_steps) optimizer steps (a pass drops the last partial micro-batch).")
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="The learning-rate schedule, built by transformers.get_scheduler exactly as HF "
        "Trainer builds it (linear warmup from 0, then the named decay). Hashed with every config: "
        "adding it moved all config hashes once, because 'linear' warmup used to start at lr/(warmup+1).")
    warmup_ratio: float | None = Field(
        None, ge=0.0, le=1.0, json_schema_extra=added_in(2), description="Warmup as a fraction of the total "
        "steps (ceil(ratio * steps), as HF computes it) instead of warmup_steps (exactly one of the two).")
    batch_size: int = Field(8, ge=1, le=4096)
    gradient_accumulation_steps: int = Field(1, ge=1, le=4096)
    learning_rate: float = Field(5e-3, gt=0, le=1.0)
    warmup_steps: int = Field(4, ge=0)
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    adam_epsilon: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    eval_steps: int = Field(20, ge=1)
    eval_batch_size: int = Field(16, ge=1, le=4096)
    trace_every: int = Field(10, ge=1)
    logging_window: int = Field(10, ge=1)
    save_steps: int = Field(20, ge=1)
    save_total_limit: int = Field(2, ge=1)
    packing: bool = Field(
        False, json_schema_extra=added_in(2), description="Padding-free batches: a micro-batch's examples "
        "joined into one row, position ids restarting at each example and attention kept inside it (HF's "
        "DataCollatorWithFlattening), so no compute goes to padding. Other bits than padded batches; "
        "evaluation stays padded.")
    sample_max_new_tokens: int = Field(
        24, ge=1, le=4096, json_schema_extra=added_in(2),
        description="Greedy tokens generated per bundled evaluation prompt for samples.jsonl (generation "
        "dominates the end of a short run on a real or 4-bit model).")

    @model_validator(mode="before")
    @classmethod
    def _one_length_and_one_warmup(cls, data: Any) -> Any:
        """num_epochs replaces max_steps and warmup_ratio replaces warmup_steps; giving both of a
        pair is an error, and the replaced key resolves to null (max_steps) or 0 (warmup_steps)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for new, old, unset in (("num_epochs", "max_steps", None), ("warmup_ratio", "warmup_steps", 0)):
            if data.get(new) is None:
                continue
            if data.get(old) not in (None, unset):
                raise ValueError(f"training.{new} and training.{old} are alternatives: set one of them, not both")
            data[old] = unset
        if "max_steps" in data and data["max_steps"] is None and data.get("num_epochs") is None:
            raise ValueError("training.max_steps is null but training.num_epochs is not set: set one of them")
        return data

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainingSection:
        if self.lr_scheduler_type == "constant" and (self.warmup_steps or self.warmup_ratio):
            raise ValueError("training.lr_scheduler_type 'constant' has no warmup (as in transformers); use "
                             "'constant_with_warmup' or set training.warmup_steps to 0")
        if self.max_steps is not None and self.warmup_steps > self.max_steps:
            raise ValueError(
                f"training.warmup_steps ({self.warmup_steps}) must be at most training.max_steps "
                f"({self.max_steps})"
            )
        return self


class DeterminismSection(_Section):
    """How to compute: a profile from the registry in qlorax.profiles (strict, portable, off)."""

    profile: str = Field(DEFAULT_PROFILE, json_schema_extra={"enum": list(PROFILES)})

    @field_validator("profile")
    @classmethod
    def _registered(cls, value: str) -> str:
        if value not in PROFILES:
            raise ValueError(f"unknown profile {value!r}; expected one of {', '.join(PROFILES)}")
        return value


class InputIdentities(Protocol):
    """What the model and data names stand for (qlorax.inputs.ResolvedInputs provides it)."""

    @property
    def model(self) -> str: ...

    @property
    def data(self) -> str: ...


class QloraxConfig(_Section):
    """The whole resolved config."""

    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    determinism: DeterminismSection = Field(default_factory=DeterminismSection)

    def canonical(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def portable_form(self, identities: InputIdentities) -> dict[str, Any]:
        """The canonical form with the model and data names replaced by their identities
        (qlorax.inputs resolves them: the content digest of the model however it is named —
        preset, directory or GGUF file — and of a local data file; hub ids and bundled
        datasets keep their names). What deterministic artifacts record: the same inputs named
        otherwise, in another directory or on another machine give the same form."""
        form = self.canonical()
        form["model"]["name_or_path"] = identities.model
        form["data"]["path"] = identities.data
        return form

    def hashed_form(self, identities: InputIdentities) -> dict[str, Any]:
        """What the config hash covers: every section except `determinism` (which says *how*;
        the profile is part of the environment fingerprint), and of the keys added after
        schema 1 only those set to a non-default value — so adding a key never changes the
        hash of an existing config, while changing any value (or an existing default) does."""
        portable = self.portable_form(identities)
        form: dict[str, Any] = {}
        for name, section in self:
            if name == "determinism":
                continue
            values = portable[name]
            for key, field in type(section).model_fields.items():
                if _added_after_schema_1(field) and values[key] == _default_json(section, key):
                    del values[key]
            form[name] = values
        return form

    def config_hash(self, identities: InputIdentities) -> str:
        """SHA-256 of the canonical JSON of `hashed_form()` (qlorax.inputs.resolve_inputs
        computes it once per process, with the identities)."""
        return sha256_bytes(canonical_json(self.hashed_form(identities)).encode())


def _added_after_schema_1(field: Any) -> bool:
    extra = field.json_schema_extra
    return isinstance(extra, dict) and int(extra.get("added_in_schema", 1)) > 1


def _default_json(section: BaseModel, key: str) -> Any:
    return type(section)().model_dump(mode="json")[key]


_SECTIONS: dict[str, type[BaseModel]] = {
    name: field.annotation  # type: ignore[misc]
    for name, field in QloraxConfig.model_fields.items()
}


def default_config_path() -> Path:
    """The shipped default config (a file users can copy)."""
    return Path(str(resources.files("qlorax") / "presets" / "default.yaml"))


def _valid_keys(section: str | None) -> list[str]:
    if section is None:
        return list(_SECTIONS)
    model = _SECTIONS.get(section)
    return list(model.model_fields) if model else []


def unknown_key_hint(key: str, section: str | None) -> str:
    """What to tell a user about an unknown key: its qlorax name when it is another tool's key
    (HF, TRL, axolotl), else a close spelling in the same section (a typo), else the valid keys.
    The cutoff is high on purpose: no suggestion is better than an unrelated one."""
    foreign = foreign_key_hint(key)
    if foreign is not None:
        return foreign
    choices = _valid_keys(section)
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.8)
    return f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(choices)}"


def _describe(error: dict[str, Any], source: str) -> str:
    loc = [str(part) for part in error["loc"]]
    where = ".".join(loc) if loc else "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        key = loc[-1]
        section = loc[0] if len(loc) > 1 else None
        in_section = f"in section '{section}'" if section else "at the top level"
        return f"{source}: unknown key '{key}' {in_section}; {unknown_key_hint(key, section)}"
    if kind == "strict_type":  # its message already shows the value
        return f"{source}: {where}: {error['msg']}"
    value = error.get("input")
    shown = repr(value) if not isinstance(value, dict) else "a mapping"
    return f"{source}: {where}: {error['msg']} (got {shown})"


def parse_config(data: Any, source: str = "config") -> QloraxConfig:
    """Validate a mapping into a QloraxConfig, turning pydantic errors into one paragraph."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    if bad := non_finite_keys(data):
        raise ConfigError(f"{source}: {', '.join(bad)}: every number in a config must be finite "
                          "(.inf and .nan are not valid values)")
    try:
        return QloraxConfig.model_validate(data)
    except ValidationError as exc:
        problems = [_describe(err, source) for err in exc.errors()]
        raise ConfigError(" ".join(problems)) from None


def load_config(path: Path | str | None, overrides: dict[str, dict[str, Any]] | None = None) -> QloraxConfig:
    """Load YAML (or the defaults when path is None), apply CLI overrides, validate."""
    data: dict[str, Any] = {}
    source = "default config"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except OSError as exc:
            raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
        try:
            loaded = load_yaml_unique(text, str(path))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        data = loaded or {}
        for section, value in data.items():
            if section in _SECTIONS and value is not None and not isinstance(value, dict):
                raise ConfigError(f"{path}: section '{section}' must be a mapping, got {type(value).__name__}")
    for section, values in (overrides or {}).items():
        merged = dict(data.get(section) or {})
        merged.update(values)
        data[section] = merged
    return parse_config(data, source)


def parse_overrides(pairs: list[str] | None) -> dict[str, dict[str, Any]]:
    """`section.key=value` strings (from --set) into nested overrides (values parsed as YAML scalars)."""
    overrides: dict[str, dict[str, Any]] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not section or not name:
            raise ConfigError(f"--set {pair!r}: expected section.key=value, e.g. training.max_steps=10")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        overrides.setdefault(section, {})[name] = value
    return overrides


def config_to_yaml(config: QloraxConfig) -> str:
    return yaml.safe_dump(config.canonical(), sort_keys=False)


def config_json_schema() -> dict[str, Any]:
    return QloraxConfig.model_json_schema()
