"""The `probe` job: the first training step on whatever processor this process runs on
(native, or one that QEMU emulates), written out for `qlorax probe` to compare.

The processor is read from CPUID *before* torch is imported (torch takes ~40 s to import
under emulation), so a processor the profile cannot serve is refused in about a second,
with exit 2 naming the missing instruction set. The step itself is train.py's: the same
set-up (seeds, model, data, LoRA, AdamW), the same batch function, loss, clipping and
optimizer step; what it adds is keeping the gradients and the updated LoRA weights.

Without a `result` path it only prints the processor facts (after the same check); a
refused processor's `<result>.json` holds the refusal. Otherwise it writes `<result>.json`
(digests, loss and grad-norm bits, processor facts) and `<result>.safetensors` (every
gradient and updated LoRA tensor, for ULP distances).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from qlorax.determinism import pinned_profile

# Only what the processor check needs is imported here: under emulation every module costs.
from qlorax.devices import get_device
from qlorax.errors import ConfigError, DataError
from qlorax.profiles import get_profile

GRAD_PREFIX = "grad/"
WEIGHT_PREFIX = "weight/"


def run(payload: dict[str, Any]) -> int:
    profile = get_profile(pinned_profile(), "profile")
    reason, cpu = get_device(profile.device).unsupported(profile)
    result = Path(payload["result"]) if payload.get("result") else None
    if reason:
        where = f"emulated as {cpu['emulated_cpu']}" if cpu["emulated"] else "this process runs on"
        message = (f"{reason} (CPUID of the processor {where}, read before training): its kernels would fall back "
                   f"to other instructions and give other bits, so the {profile.name} profile refuses it")
        if result is not None:  # the refusal itself is the result: the parent reports it as such
            from qlorax.artifacts import write_json_atomic

            write_json_atomic(result.with_suffix(".json"), {"refused": message, "processor": cpu,
                                                            "profile": profile.name})
        raise ConfigError(message)
    if result is None:
        print(json.dumps(cpu), flush=True)
        return 0
    with tempfile.TemporaryDirectory(prefix="qlorax-probe-") as scratch:
        record, tensors = first_step(payload, Path(scratch))
    from safetensors.torch import save

    from qlorax.artifacts import write_bytes_atomic, write_json_atomic

    write_bytes_atomic(result.with_suffix(".safetensors"), save(tensors))
    write_json_atomic(result.with_suffix(".json"), {**record, "processor": cpu, "profile": profile.name,
                                                    "threads": int(payload["threads"])})
    return 0


def tensor_sha256(tensor: Any) -> str:
    return hashlib.sha256(get_device().tensor_bytes(tensor)).hexdigest()


def first_step(payload: dict[str, Any], scratch: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Set up as `qlorax train` does (into a scratch run directory), run optimizer step 1 and
    return its record and tensors (gradients before clipping, LoRA weights after the step)."""
    import torch

    from qlorax.config import parse_config
    from qlorax.data import collate, micro_batch_indices
    from qlorax.determinism import torch_fingerprint
    from qlorax.loss import summed_token_loss, target_tokens
    from qlorax.train import TrainingJob, set_up

    config = parse_config(payload["config"], "probe config")
    state = set_up(TrainingJob(config=config, output_dir=scratch, threads=int(payload["threads"])))
    state.log.close()
    tcfg, train = config.training, state.data.train
    batch = collate([train[i] for i in micro_batch_indices(len(train), tcfg.batch_size, tcfg.seed, 0)],
                    state.tokenizer.pad_token_id)
    targets = target_tokens(batch)
    if targets == 0:
        raise DataError(f"{config.data.path}: the probe's batch ({tcfg.batch_size} sequences of at most "
                        f"{config.data.max_length} tokens) has no target token left after masking and truncation, "
                        "so its gradients would all be zero and prove nothing: use a longer --batch (e.g. 2x64) "
                        "or --set data.train_on_inputs=true")
    state.dropout.begin(0)
    loss = summed_token_loss(state.model, batch) / targets
    loss.backward()
    names = [name for name, p in sorted(state.model.named_parameters()) if p.requires_grad]
    parameters = dict(state.model.named_parameters())
    tensors = {GRAD_PREFIX + name: parameters[name].grad.detach().clone() for name in names}
    grad_norm = torch.nn.utils.clip_grad_norm_(state.trainable, tcfg.max_grad_norm, foreach=False)
    state.optimizer.step()
    tensors.update({WEIGHT_PREFIX + name: parameters[name].detach().clone() for name in names})
    facts = torch_fingerprint()
    return {
        "loss_bits": float(loss.detach()).hex(),
        "grad_norm_bits": float(grad_norm).hex(),
        "batch_shape": list(batch["input_ids"].shape),
        "tensor_sha256": {name: tensor_sha256(tensor) for name, tensor in sorted(tensors.items())},
        "torch": {key: facts[key] for key in ("torch", "mkl", "onednn", "cpu_capability")},
        "validation": {"valid": state.validation[0], "messages": state.validation[1]},
    }, tensors
