"""The portable profile's exact math (issue 23): no approximate instruction in a training step.

Live: the VML entry points a real step calls, traced under gdb (scripts/vml_kernels.py), are
none under `portable` and the vector-math functions under `strict` (which proves the trace
sees them). The processors themselves are compared in test_probe.py (native, emulated Intel
and emulated AMD agree). Static: the float64 sin/cos against libm, the rotary module against
HF's, the refusal of a model family it does not cover, the optimizer each profile builds.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch  # installed by `make test`: missing, this module fails instead of skipping

from conftest import REPO, TINY_CONFIG
from qlorax.errors import ConfigError
from qlorax.exact_math import _rotary_module_class, exact_sin_cos, use_exact_rotary
from qlorax.optim import DEFAULT_OPTIMIZER, build_optimizer
from qlorax.profiles import PROFILES


def _trace_command(profile: str) -> list[str]:
    return [sys.executable, str(REPO / "scripts" / "vml_kernels.py"), "--profile", profile,
            "--config", str(TINY_CONFIG)]


def test_a_portable_step_calls_no_vml_function_and_a_strict_one_does() -> None:
    traces = {profile: subprocess.Popen(_trace_command(profile), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True) for profile in ("portable", "strict")}
    results = {}
    for profile, process in traces.items():
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, out + err
        results[profile] = json.loads(out.strip().splitlines()[-1])
    assert results["portable"]["kernels"] == [], results["portable"]
    # strict: cos/sin (HF's rotary tables) at least, and nothing outside the vector math warmed up
    # at start-up (a new one appearing fails here)
    strict = set(results["strict"]["functions"])
    assert {"sCos", "sSin"} <= strict, strict
    assert strict <= {f"{p}{name}" for p in "sd" for name in ("Sqrt", "Exp", "Ln", "Sin", "Cos", "Tanh", "Erf")}


def test_exact_sin_cos_rounds_to_libms_float32_and_stays_within_an_ulp() -> None:
    generator = torch.Generator().manual_seed(0)
    angle = torch.cat([torch.rand(20000, dtype=torch.float64, generator=generator) * 9000,
                       torch.tensor([0.0, math.pi / 4, math.pi / 2, math.pi, 1e-9, 8191.0], dtype=torch.float64)])
    sin, cos = exact_sin_cos(angle)
    reference_sin = torch.tensor([math.sin(a) for a in angle.tolist()], dtype=torch.float64)
    reference_cos = torch.tensor([math.cos(a) for a in angle.tolist()], dtype=torch.float64)
    assert float((sin - reference_sin).abs().max()) <= 2.3e-16
    assert float((cos - reference_cos).abs().max()) <= 2.3e-16
    assert torch.equal(sin.float(), reference_sin.float()) and torch.equal(cos.float(), reference_cos.float())
    with pytest.raises(ValueError, match="must stay below"):
        exact_sin_cos(torch.tensor([2.0**21], dtype=torch.float64))


def _tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(config)


def test_the_exact_rotary_module_gives_hfs_tables_within_an_ulp_and_replaces_it() -> None:
    model = _tiny_llama()
    hf_rotary = model.model.rotary_emb
    positions = torch.tensor([[0, 1, 2, 3, 200, 511], [7, 8, 9, 10, 11, 12]])
    x = torch.zeros(2, 6, 32)
    hf_cos, hf_sin = hf_rotary(x, positions)
    use_exact_rotary(model, "tiny-llama")
    exact = model.model.rotary_emb
    assert type(exact).__name__ == "ExactRotaryEmbedding" and torch.equal(exact.inv_freq, hf_rotary.inv_freq)
    cos, sin = exact(x, positions)
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == hf_cos.shape
    assert float((cos - hf_cos).abs().max()) <= 2e-6 and float((sin - hf_sin).abs().max()) <= 2e-6
    # a table built for short positions grows for longer ones and gives the same rows
    again = _rotary_module_class()(hf_rotary.inv_freq, 1.0)
    short_cos, _ = again(x[:, :1], torch.tensor([[3]]))
    long_cos, _ = again(x, positions)
    assert torch.equal(short_cos[0, 0], long_cos[0, 3]) and torch.equal(long_cos, cos)
    logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits  # the model runs with it
    assert logits.shape == (1, 3, 64)


def test_portable_refuses_a_model_whose_rotary_it_does_not_cover() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    with pytest.raises(ConfigError, match=r"gpt2-tiny is a gpt2 model .* --profile strict") as raised:
        use_exact_rotary(model, "gpt2-tiny")
    assert raised.value.exit_code == 2


def test_every_profile_builds_the_fused_adamw_and_portable_checks_onednn() -> None:
    class Training:
        learning_rate, adam_beta1, adam_beta2, adam_epsilon, weight_decay = 1e-3, 0.9, 0.999, 1e-8, 0.0

    params = [torch.nn.Parameter(torch.ones(4))]
    assert build_optimizer(DEFAULT_OPTIMIZER, params, Training()).defaults["fused"] is True
    portable, strict = PROFILES["portable"], PROFILES["strict"]
    assert portable.exact_math and not strict.exact_math
    assert portable.environment(1)["MKL_CBWR"] == "COMPATIBLE" and strict.environment(1)["MKL_CBWR"] == "AUTO,STRICT"
    facts = {"deterministic_algorithms": True, "num_threads": 1, "cpu_capability": "AVX2", "mkldnn_enabled": True}
    assert portable.torch_problems(facts, 1) == ["oneDNN (mkldnn) is enabled; exact math needs it off"]
    assert strict.torch_problems(facts, 1) == []


def test_the_vml_trace_script_names_only_vml_entry_points() -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import vml_kernels
    finally:
        sys.path.remove(str(REPO / "scripts"))
    names = vml_kernels.exported_kernels()
    assert {"vmsSqrt", "vmsCos", "vsSin", "vmdExp"} <= set(names)
    assert all(vml_kernels.KERNEL.match(name) for name in names)
    assert vml_kernels.KERNEL.match("vmsSqrt_64").group(1) == "sSqrt"
    assert not any(vml_kernels.KERNEL.match(name) for name in ("vsldNewStream", "viRngBernoulli", "vmlSetMode"))
    assert Path(vml_kernels.__file__).is_file()


def test_resume_refuses_a_checkpoint_of_another_kind_of_run(tmp_path: Path) -> None:
    """A checkpoint written before 0.2.4 drew its dropout masks from torch's generator, and a
    portable one before 0.2.3 holds single-tensor AdamW param groups: resume refuses both (exit 2)
    and accepts its own kind."""
    from qlorax.checkpoint import DROPOUT_STREAM, optimizer_to_parts, refuse_another_kind_of_run

    class Training:
        learning_rate, adam_beta1, adam_beta2, adam_epsilon, weight_decay = 1e-3, 0.9, 0.999, 1e-8, 0.0

    params = [torch.nn.Parameter(torch.ones(4))]
    fused = build_optimizer(DEFAULT_OPTIMIZER, params, Training())
    _, own = optimizer_to_parts(fused)
    _, single = optimizer_to_parts(torch.optim.AdamW(params, foreach=False))
    with pytest.raises(ConfigError, match=r"checkpoint-00000002 was written by a qlorax before 0.2.4, whose dropout "
                                          r"masks were drawn another way") as raised:
        refuse_another_kind_of_run(tmp_path, "checkpoint-00000002", fused,
                                   {"dropout_stream": "per_micro_batch", "optimizer": own})
    assert raised.value.exit_code == 2
    with pytest.raises(ConfigError, match=r"checkpoint-00000002 was written with AdamW's single-tensor kernel .* "
                                          r"trains with the fused one") as raised:
        refuse_another_kind_of_run(tmp_path, "checkpoint-00000002", fused,
                                   {"dropout_stream": DROPOUT_STREAM, "optimizer": single})
    assert raised.value.exit_code == 2
    refuse_another_kind_of_run(tmp_path, "checkpoint-00000002", fused,
                               {"dropout_stream": DROPOUT_STREAM, "optimizer": own})
