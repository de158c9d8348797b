"""One copy of the base model per machine (issue 24): local workers map the frozen weights.

Live, on a 64 MiB model of linear layers: two processes swap their weights for the machine's
shared file; while both hold it, the second's mapping of it is shared (no private page, its
proportional share half the size), which the kernel's /proc/<pid>/smaps says. A file whose
bits differ from the loaded weights is rewritten, never used. A 2-worker training of a
bfloat16-stored base shares it and keeps the one-process bits (a float32-stored base, as the
presets are, is memory-mapped by transformers and shared by the page cache already).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch  # installed by `make test`: missing, this module fails instead of skipping

from conftest import REPO, TINY_CONFIG, run_clis
from qlorax.config import load_config
from qlorax.model import resolve_base_model
from qlorax.shared_weights import map_file, share_base_weights, shared_weights_path, stored_as_float32

DIGEST = "5e" * 32
HOLDER = r"""
import json, os, sys
import torch
sys.path.insert(0, {src!r})
from qlorax.shared_weights import share_base_weights, shared_weights_path

torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(16)])
before = [p.detach().clone() for p in model.parameters()]
shared = share_base_weights(model, {digest!r})
same = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
del before
checksum = float(sum(p.detach().double().sum() for p in model.parameters()))  # touch every page
path = str(shared_weights_path({digest!r}))


def mapping():
    stats, inside = {{}}, False
    for line in open(f"/proc/{{os.getpid()}}/smaps"):
        first = line.split()[0]
        if "-" in first and not first.endswith(":"):
            inside = line.rstrip().endswith(path)
        elif inside and first.rstrip(":") in ("Rss", "Pss", "Private_Clean", "Private_Dirty"):
            stats[first.rstrip(":")] = stats.get(first.rstrip(":"), 0) + int(line.split()[1])
    return stats


print(json.dumps({{"shared": shared, "same": same, "checksum": checksum, "mapping": mapping()}}), flush=True)
sys.stdin.readline()  # hold the mapping until the test has measured the other process
print(json.dumps({{"mapping": mapping()}}), flush=True)
"""


def _holder(home: Path) -> subprocess.Popen[str]:
    code = HOLDER.format(src=str(REPO / "src"), digest=DIGEST)
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "QLORAX_HOME": str(home)})


def test_two_processes_hold_one_copy_of_the_weights(tmp_path: Path) -> None:
    first = _holder(tmp_path)
    first_report = json.loads(first.stdout.readline())
    second = _holder(tmp_path)
    second_report = json.loads(second.stdout.readline())
    first.stdin.write("\n")
    first.stdin.flush()
    first_later = json.loads(first.stdout.readline())
    second.stdin.write("\n")
    second.stdin.flush()
    second.communicate(timeout=60)
    first.communicate(timeout=60)
    size_kib = 16 * (1024 * 1024 + 1024) * 4 // 1024
    assert first_report["shared"] == second_report["shared"] == size_kib * 1024
    assert first_report["same"] and second_report["same"]  # the weights' values did not change
    assert first_report["checksum"] == second_report["checksum"]
    mapped = second_report["mapping"]
    assert mapped["Rss"] >= 0.95 * size_kib, mapped  # every page of the weights is in the mapping
    assert mapped["Private_Clean"] + mapped["Private_Dirty"] <= 0.02 * size_kib, mapped  # none of it private
    assert mapped["Pss"] <= 0.55 * size_kib, mapped  # counted half here, half in the first process
    assert first_later["mapping"]["Pss"] <= 0.55 * size_kib, first_later


def test_a_shared_file_with_other_bits_is_rewritten_not_used(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("QLORAX_HOME", str(tmp_path))
    torch.manual_seed(1)
    model = torch.nn.Linear(64, 64)
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert share_base_weights(model, DIGEST) == (64 * 64 + 64) * 4
    path = shared_weights_path(DIGEST)
    damaged = bytearray(path.read_bytes())
    damaged[-4:] = b"\x00\x00\x80\x7f"  # the last bias value becomes +inf
    path.write_bytes(bytes(damaged))
    again = torch.nn.Linear(64, 64)
    with torch.no_grad():
        for name, p in again.named_parameters():
            p.copy_(original[name])
    share_base_weights(again, DIGEST)
    assert all(torch.equal(p, original[name]) for name, p in again.named_parameters())
    assert all(torch.equal(view, original[name]) for name, view in map_file(path).items())
    assert not list(path.parent.glob("*.partial"))


def _bfloat16_copy(target: Path) -> Path:
    """The tiny preset with its weights stored in bfloat16, as most Hub checkpoints are."""
    import shutil

    from safetensors.torch import load_file, save_file

    from qlorax.config import load_config
    from qlorax.model import resolve_base_model

    source = Path(resolve_base_model(load_config(TINY_CONFIG).model).local_dir)
    shutil.copytree(source, target)
    for path in target.glob("*.safetensors"):
        tensors = load_file(path)
        save_file({name: tensor.to(torch.bfloat16) for name, tensor in tensors.items()}, str(path),
                  metadata={"format": "pt"})
    return target


def test_workers_on_a_bfloat16_base_share_it_and_keep_the_one_process_bits(tmp_path: Path) -> None:
    """A float32 base (the presets) is memory-mapped by transformers already; a bfloat16 one is
    converted, so its two workers share qlorax's float32 copy, and the adapter is the bits of
    one process."""
    model = _bfloat16_copy(tmp_path / "tiny-bf16")
    assert stored_as_float32(Path(resolve_base_model(load_config(TINY_CONFIG).model).local_dir))
    assert not stored_as_float32(model)
    common = ("--config", str(TINY_CONFIG), "--threads", "1", "--set", f"model.name_or_path={model}",
              "--set", "training.max_steps=1", "--set", "training.gradient_accumulation_steps=2",
              "--set", "training.batch_size=2", "--set", "training.sample_max_new_tokens=2")
    env = {"QLORAX_HOME": str(tmp_path / "home"), "QLORAX_CACHE": "off"}
    one, two = run_clis(["train", *common, "--output-dir", str(tmp_path / "one")],
                        ["train", *common, "--workers", "2", "--output-dir", str(tmp_path / "two")], env=env)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    adapters = {(tmp_path / run / "adapter_model.safetensors").read_bytes() for run in ("one", "two")}
    assert len(adapters) == 1
    log = (tmp_path / "two" / "train.log").read_text()
    assert re.search(r"phase model: .*\d+ MiB of base weights shared", log), log
    assert "shared" not in (tmp_path / "one" / "train.log").read_text()
    assert len(list((tmp_path / "home" / "shared-weights").glob("*-float32.safetensors"))) == 1
