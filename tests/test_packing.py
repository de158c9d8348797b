"""training.packing: a micro-batch's examples in one row, no padding, attention inside each example."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch  # installed by `make test`: missing, this module fails instead of skipping

from conftest import TINY_CONFIG, assert_no_traceback, deterministic_files, run_clis
from qlorax.artifacts import read_json
from qlorax.data import IGNORE_INDEX, TokenizedExample, collate, input_tokens, pack
from qlorax.errors import ConfigError
from qlorax.loss import refuse_unpackable_model, summed_token_loss, target_tokens
from qlorax.packed_attention import use_packed_attention


def _example(length: int, prompt: int, offset: int) -> TokenizedExample:
    ids = [(13 * i + offset) % 400 + 3 for i in range(length)]
    return TokenizedExample(line=1, input_ids=ids, labels=[IGNORE_INDEX] * prompt + ids[prompt:])


EXAMPLES = [_example(30, 10, 1), _example(12, 4, 2), _example(21, 21, 3), _example(25, 5, 4)]


def test_a_packed_row_restarts_positions_and_predicts_nothing_across_examples() -> None:
    packed, padded = pack(EXAMPLES), collate(EXAMPLES, pad_id=0)
    assert packed["input_ids"].shape == (1, 88) and "attention_mask" not in packed
    assert packed["position_ids"][0, :32].tolist() == [*range(30), 0, 1]
    assert packed["input_ids"][0, 30:42].tolist() == EXAMPLES[1].input_ids
    starts = [0, 30, 42, 63]
    assert all(packed["labels"][0, start] == IGNORE_INDEX for start in starts)
    assert packed["labels"][0, 43:63].tolist() == [IGNORE_INDEX] * 20  # the all-prompt example
    assert target_tokens(packed) == target_tokens(padded) == 20 + 8 + 0 + 20
    assert input_tokens(packed) == input_tokens(padded) == 88 < padded["input_ids"].numel()


def test_packed_and_padded_batches_give_the_same_loss_and_gradients() -> None:
    """Attention stays inside each example: the packed loss and LoRA gradients are the padded
    ones up to rounding (other matmul shapes), on the tiny preset with LoRA and no dropout,
    through transformers' block-diagonal mask and through qlorax's per-example attention."""
    from transformers import AutoModelForCausalLM

    from qlorax.config import LoraSection
    from qlorax.model import wrap_with_lora
    from qlorax.model_presets import materialize_preset

    base = AutoModelForCausalLM.from_pretrained(materialize_preset(), dtype=torch.float32)
    model = wrap_with_lora(base, LoraSection(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]), 7,
                           "tiny")
    results = []
    batches = [collate(EXAMPLES, pad_id=0), pack(EXAMPLES)]
    for batch in batches:
        model.zero_grad(set_to_none=True)
        loss = summed_token_loss(model, batch)
        loss.backward()
        grads = [p.grad.reshape(-1) for p in model.parameters() if p.requires_grad]
        results.append((float(loss.detach()), torch.cat(grads)))
    use_packed_attention(model.get_base_model())
    model.zero_grad(set_to_none=True)
    loss = summed_token_loss(model, batches[1])
    loss.backward()
    grads = [p.grad.reshape(-1) for p in model.parameters() if p.requires_grad]
    results.append((float(loss.detach()), torch.cat(grads)))
    (padded_loss, padded_grad), (masked_loss, masked_grad), (packed_loss, packed_grad) = results
    for loss_value, grad in ((masked_loss, masked_grad), (packed_loss, packed_grad)):
        assert loss_value == pytest.approx(padded_loss, rel=1e-5)
        assert torch.allclose(grad, padded_grad, rtol=1e-4, atol=1e-6)
    # A leak across examples would change the last example's loss: packing it alone agrees too.
    model.zero_grad(set_to_none=True)
    assert float(summed_token_loss(model, pack(EXAMPLES[3:]))) == pytest.approx(
        float(summed_token_loss(model, collate(EXAMPLES[3:], pad_id=0))), rel=1e-5)


def test_packed_attention_finds_each_example_and_leaves_other_rows_to_sdpa() -> None:
    from qlorax.packed_attention import example_starts

    assert example_starts(pack(EXAMPLES)["position_ids"], 1) == [0, 30, 42, 63]
    assert example_starts(pack(EXAMPLES[:1])["position_ids"], 1) is None  # one example: plain causal
    assert example_starts(torch.arange(10).reshape(1, 10), 1) is None
    assert example_starts(torch.tensor([[0, 1, 0, 1]] * 2), 2) is None  # padded batches
    assert example_starts(None, 1) is None


def test_packing_refuses_a_model_whose_attention_ignores_position_ids() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    with pytest.raises(ConfigError, match=r"training.packing: gpt2-tiny is a gpt2 model") as raised:
        refuse_unpackable_model(model, "gpt2-tiny")
    assert raised.value.exit_code == 2


def test_packed_runs_agree_across_thread_counts_and_count_real_tokens(tmp_path: Path) -> None:
    runs = {threads: tmp_path / f"t{threads}" for threads in (1, 2)}
    common = ["--config", str(TINY_CONFIG), "--set", "training.packing=true", "--set", "training.max_steps=6",
              "--set", "training.sample_max_new_tokens=2"]
    results = run_clis(*(["train", *common, "--threads", str(t), "--output-dir", str(run)] for t, run in runs.items()))
    for result in results:
        assert result.returncode == 0, result.stdout + result.stderr
        assert_no_traceback(result)
    assert deterministic_files(runs[1]) == deterministic_files(runs[2])
    assert read_json(runs[1] / "training_args.json")["packing"] is True
    trace = [line for line in (runs[1] / "trace.jsonl").read_text().splitlines() if line]
    assert len(trace) == 6
