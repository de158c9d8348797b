"""Our loop and HF Trainer + PEFT train the same adapter, bit for bit.

The same names must mean the same training (issue: "speak the field's language"): the tiny
config for 3 optimizer steps with gradient accumulation 2, the linear schedule with warmup,
AdamW, clipping — through `qlorax train` and through HF `Trainer(full_determinism=True)` on the
same model, LoRA init and stream of batches (bench/_common.run_matched_hf_trainer, which the
speed benchmarks use too). Dropout is 0: the two loops draw dropout masks in another order.
lm_head is not a target: our head runs on labelled rows only, so a LoRA on lm_head itself sums
its gradient over fewer rows (same value, other last bits; tests/test_loss.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch  # installed by `make test`: missing, this module fails instead of skipping

from conftest import TINY_CONFIG, BackgroundCli

BENCH = Path(__file__).resolve().parents[1] / "bench"
OVERRIDES = {
    "training": {"max_steps": 3, "gradient_accumulation_steps": 2, "batch_size": 4, "warmup_steps": 1,
                 "eval_steps": 3, "save_steps": 3},
    "lora": {"dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"]},
}
HF_CHILD = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from _common import run_matched_hf_trainer
from qlorax.config import load_config
from qlorax.determinism import DeterministicConfig
cfg = load_config(Path(sys.argv[2]), json.loads(sys.argv[3]))
DeterministicConfig.setup_deterministic_environment(cfg.training.seed)
print(json.dumps(run_matched_hf_trainer(cfg, None, Path(sys.argv[4]), adapter_dir=Path(sys.argv[5]))))
"""


def _overrides_as_set_args() -> list[str]:
    args = []
    for section, values in OVERRIDES.items():
        for key, value in values.items():
            args += ["--set", f"{section}.{key}={json.dumps(value)}"]
    return args


def test_qlorax_and_hf_trainer_train_the_same_adapter_bits(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from qlorax.determinism import child_environment

    ours = tmp_path / "ours"
    # The two trainings side by side, 1 thread each (separate pinned processes: no bit depends on it).
    trained = BackgroundCli("train", "--config", str(TINY_CONFIG), "--output-dir", str(ours), "--threads", "1",
                            *_overrides_as_set_args())
    env, _ = child_environment(os.environ, "strict", 1)
    hf = subprocess.run([sys.executable, "-c", HF_CHILD, str(BENCH), str(TINY_CONFIG), json.dumps(OVERRIDES),
                         str(tmp_path / "hf-work"), str(tmp_path / "hf-adapter")],
                        capture_output=True, text=True, env=env, timeout=600)
    ours_result = trained.result(timeout=600)
    assert ours_result.returncode == 0, ours_result.stderr
    assert hf.returncode == 0, hf.stderr[-3000:]
    ran = json.loads(hf.stdout.strip().splitlines()[-1])
    assert ran["steps"] == 3 and ran["batches"] == 6 and ran["deterministic_algorithms"]

    ours_tensors = load_file(str(ours / "adapter_model.safetensors"))
    hf_tensors = load_file(str(tmp_path / "hf-adapter" / "adapter_model.safetensors"))
    assert ours_tensors.keys() == hf_tensors.keys() and len(ours_tensors) == 4 * 7 * 2  # 4 layers, 7 modules, A and B
    different = [name for name in ours_tensors if not torch.equal(ours_tensors[name], hf_tensors[name])]
    assert different == []
    # ... and training moved them: lora_B starts at zero.
    assert any(name.endswith("lora_B.weight") and ours_tensors[name].abs().sum() > 0 for name in ours_tensors)
