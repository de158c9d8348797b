"""Exactly rounded math for the `portable` profile: the same bits on any x86-64 vendor.

Intel and AMD processors agree bit for bit on IEEE add, multiply, FMA, divide and sqrt; they
differ on the approximate instructions (`rcpps`, `rsqrtps`) that MKL's vector math (VML) starts
its float32 sqrt, sin and cos from (see docs/determinism.md). torch runs `Tensor.sqrt`, `.sin`,
`.cos`, `.exp`, `.log`, `.tanh` and `.erf` on float32 and float64 through VML, and no MKL setting
reaches it. Two places in a training step use them:

- AdamW's denominator (`exp_avg_sq.sqrt()` in the single-tensor kernel): qlorax builds AdamW
  with `fused=True` (every profile since 0.2.4), ATen's own kernel, whose sqrt is the exactly
  rounded `sqrtps`;
- the rotary tables (`cos`/`sin` of the position angles, every forward): `ExactRotaryEmbedding`
  replaces the model's rotary module (module replacement, as PEFT does) and computes them in
  float64 from adds and multiplies only (fdlibm's reduction and polynomials), then rounds.

`scripts/vml_kernels.py` lists the VML kernels a training step calls; under `portable` it
must list none (tests/test_exact_math.py).
"""

from __future__ import annotations

from typing import Any

from qlorax.errors import ConfigError

# Model families whose rotary module is HF's default RoPE (`rotary_emb(x, position_ids) ->
# (cos, sin)`, inv_freq buffer, attention_scaling) at model.model.rotary_emb.
ROTARY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

# pi/2 in three parts, the first two with trailing zero bits so that k * part is exact for
# the k of any angle below 2**20 (fdlibm's __ieee754_rem_pio2 constants); 2/pi rounded.
_PIO2_1 = 1.57079632673412561417e+00
_PIO2_2 = 6.07710050630396597660e-11
_PIO2_3 = 2.02226624871116645580e-21
_TWO_OVER_PI = 6.36619772367581382433e-01
# fdlibm's __kernel_sin / __kernel_cos minimax coefficients on [-pi/4, pi/4] (< 1 ulp).
_S = (-1.66666666666666324348e-01, 8.33333333332248946124e-03, -1.98412698298579493134e-04,
      2.75573137070700676789e-06, -2.50507602534068634195e-08, 1.58969099521155010221e-10)
_C = (4.16666666666666019037e-02, -1.38888888888741095749e-03, 2.48015872894767294178e-05,
      -2.75573143513906633035e-07, 2.08757232129817482790e-09, -1.13596475577881948265e-11)
_MAX_ANGLE = float(2**20)  # k * _PIO2_1 stays exact below this


def exact_sin_cos(angle: Any) -> tuple[Any, Any]:
    """sin and cos of a float64 tensor, from IEEE add, subtract, multiply and round only: the
    same bits on every processor (no VML, no libm). Within 1 ulp of float64, so rounding to
    float32 gives the correctly rounded value except within 2**-29 of a tie."""
    import torch

    if angle.numel() and float(angle.abs().max()) >= _MAX_ANGLE:
        raise ValueError(f"exact_sin_cos: |angle| must stay below {_MAX_ANGLE:g}")
    k = torch.round(angle * _TWO_OVER_PI)
    r = ((angle - k * _PIO2_1) - k * _PIO2_2) - k * _PIO2_3
    z = r * r
    s1, s2, s3, s4, s5, s6 = _S
    sin_r = r + (z * r) * (s1 + z * (s2 + z * (s3 + z * (s4 + z * (s5 + z * s6)))))
    c1, c2, c3, c4, c5, c6 = _C
    half_z = 0.5 * z
    w = 1.0 - half_z
    cos_r = w + (((1.0 - w) - half_z) + z * (z * (c1 + z * (c2 + z * (c3 + z * (c4 + z * (c5 + z * c6)))))))
    quadrant = torch.remainder(k.to(torch.int64), 4)
    sin = torch.where(quadrant == 0, sin_r, torch.where(quadrant == 1, cos_r,
                                                        torch.where(quadrant == 2, -sin_r, -cos_r)))
    cos = torch.where(quadrant == 0, cos_r, torch.where(quadrant == 1, -sin_r,
                                                        torch.where(quadrant == 2, -cos_r, sin_r)))
    return sin, cos


def _rotary_module_class() -> Any:
    import torch

    class ExactRotaryEmbedding(torch.nn.Module):
        """HF's default RoPE (`rotary_emb(x, position_ids) -> (cos, sin)`), its tables computed
        in float64 by `exact_sin_cos` once per length and gathered per position."""

        def __init__(self, inv_freq: Any, attention_scaling: float) -> None:
            super().__init__()
            self.register_buffer("inv_freq", inv_freq.detach().clone(), persistent=False)
            self.attention_scaling = float(attention_scaling)
            self._tables_cache: tuple[Any, Any] | None = None  # (cos, sin), replaced whole: micro-batches
            # may run side by side (qlorax.micro_batches)

        def _tables(self, positions: int) -> tuple[Any, Any]:
            tables = self._tables_cache
            if tables is None or tables[0].shape[0] < positions:
                length = 1 << max(6, (positions - 1).bit_length())
                # position (an integer below 2**24) times a float32 is exact in float64
                angle = torch.arange(length, dtype=torch.float64)[:, None] * self.inv_freq.to(torch.float64)
                sin, cos = exact_sin_cos(torch.cat((angle, angle), dim=-1))
                tables = ((cos * self.attention_scaling).to(torch.float32),
                          (sin * self.attention_scaling).to(torch.float32))
                self._tables_cache = tables
            return tables

        def forward(self, x: Any, position_ids: Any) -> tuple[Any, Any]:
            cos, sin = self._tables(int(position_ids.max()) + 1)
            return cos[position_ids].to(dtype=x.dtype), sin[position_ids].to(dtype=x.dtype)

    return ExactRotaryEmbedding


def use_exact_rotary(model: Any, model_name: str) -> None:
    """Replace the model's rotary module by `ExactRotaryEmbedding` (same inv_freq and scaling);
    ConfigError (exit 2) for a model whose rotary this does not cover, rather than a portable
    run that would not be portable."""
    family = getattr(getattr(model, "config", None), "model_type", None)
    inner = getattr(model, "model", None)
    rotary = getattr(inner, "rotary_emb", None)
    rope_type = getattr(rotary, "rope_type", None)
    if family not in ROTARY_FAMILIES or rotary is None or rope_type != "default":
        raise ConfigError(f"model.name_or_path: profile portable computes rotary tables exactly for the default RoPE "
                          f"of {', '.join(ROTARY_FAMILIES)} models; {model_name} is a {family or 'unknown'} model "
                          f"(rope_type {rope_type or 'none'}), so its cos/sin would come from the processor's vector "
                          "math: train it under --profile strict")
    inner.rotary_emb = _rotary_module_class()(rotary.inv_freq, rotary.attention_scaling)
