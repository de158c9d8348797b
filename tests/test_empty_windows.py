"""Windows that give a trainable tensor no gradient, or no labelled token at all (issue 21 item 6).

Two cases, each at 1 and 2 workers:
- A tensor outside a micro-batch's graph has no .grad after it. In one process autograd's
  accumulation then holds the sum over the micro-batches that did reach it, and None when none
  did, which torch.optim.AdamW skips (no moment update, no weight decay, no step count).
  `window_gradients` must leave the same .grad at every world size, and with micro-batches
  computed side by side on two threads: checked on a small module whose second layer some
  micro-batches bypass, against plain accumulation in one process.
- A window whose examples are all prompt (truncated before their completion) still has a graph
  through every LoRA tensor: its loss is 0 and every gradient an exact zero, in one process as
  with 2 workers. AdamW steps on those zeros (its moments carry the earlier steps), as qlorax did
  before data-parallel training and as HF Trainer does. Checked through the CLI: the bits are the
  same at 1 and 2 workers, and the step is taken.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch  # installed by `make test`: missing, this module fails instead of skipping

from conftest import TINY_CONFIG, assert_no_traceback, run_clis
from qlorax.artifacts import load_manifest, read_json
from qlorax.data import micro_batch_indices, split_indices
from qlorax.distributed import World, join_world, leave_world, window_gradients
from qlorax.launcher import LOOPBACK_ONLY, loopback_listener
from qlorax.micro_batches import ONE_AT_A_TIME, MicroBatchPool, gradients
from qlorax.worker import exit_without_teardown

TESTS = Path(__file__).resolve().parent
# Which micro-batches of each window reach the second layer: some (the first one not), none, some.
USES_SECOND = [[False, True, False, True], [False, False, False, False], [True, False, False, True]]


class TwoLayers(torch.nn.Module):
    """`second` is outside the graph of the micro-batches that bypass it. Initialised from its own
    generator: the test process's global RNG is left alone."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.first = torch.nn.Parameter(torch.randn(4, 4, generator=generator))
        self.second = torch.nn.Parameter(torch.randn(4, 4, generator=generator))

    def forward(self, x: torch.Tensor, through_second: bool) -> torch.Tensor:
        hidden = x @ self.first
        return (hidden @ self.second if through_second else hidden).square().sum()


def _inputs(step: int, k: int) -> torch.Tensor:
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(100 * step + k))


def _digests(model: TwoLayers) -> dict[str, str]:
    return {name: hashlib.sha256(param.detach().numpy().tobytes()).hexdigest()
            for name, param in model.named_parameters()}


def train_two_layers(world: World | None, pool: MicroBatchPool = ONE_AT_A_TIME) -> list[dict[str, Any]]:
    """Three AdamW steps (weight decay on) of 4 micro-batches each: with `window_gradients` at
    `world` (its micro-batches computed on `pool`), or (None) with autograd's own accumulation in
    one process, the reference."""
    model = TwoLayers()
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=0.01, weight_decay=0.1, foreach=False)
    history = []
    for step, pattern in enumerate(USES_SECOND):
        optimizer.zero_grad(set_to_none=True)
        if world is None:
            for k, through in enumerate(pattern):
                model(_inputs(step, k), through).backward()
        else:
            window_gradients(world, params, len(pattern),
                             lambda k, step=step, pattern=pattern: _loss_and_gradients(model, step, k, pattern[k]),
                             pool)
        grads = {name: None if p.grad is None else hashlib.sha256(p.grad.numpy().tobytes()).hexdigest()
                 for name, p in model.named_parameters()}
        optimizer.step()
        steps = {name: int(optimizer.state[p]["step"]) if p in optimizer.state else 0
                 for name, p in model.named_parameters()}
        history.append({"grads": grads, "weights": _digests(model), "steps": steps})
    return history


def _loss_and_gradients(model: TwoLayers, step: int, k: int, through: bool) -> tuple[torch.Tensor, tuple[Any, ...]]:
    loss = model(_inputs(step, k), through)
    return loss, gradients(loss, list(model.parameters()))


def child_main(rank: int, port: int, listen_fd: int | None) -> None:
    """One of 2 workers, joined as the launcher's workers join (a real gloo process group over
    rank 0's TCP store on the parent's loopback socket); rank 0 prints the history."""
    torch.set_num_threads(1)
    world = join_world(rank, 2, "127.0.0.1", port, timeout_s=120, listen_fd=listen_fd)
    history = train_two_layers(world)
    leave_world(world)
    if rank == 0:
        print(json.dumps(history))
    exit_without_teardown(0)  # as the launcher's workers end


def test_a_tensor_without_gradient_is_skipped_as_in_one_process_at_one_and_two_workers() -> None:
    listener = loopback_listener()
    port = int(listener.getsockname()[1])
    code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_empty_windows as t; " \
           "t.child_main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) if sys.argv[3:] else None)"
    env = {**os.environ, **LOOPBACK_ONLY}
    workers = [subprocess.Popen([sys.executable, "-c", code, str(rank), str(port),
                                 *([str(listener.fileno())] if rank == 0 else [])],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                pass_fds=(listener.fileno(),) if rank == 0 else ())
               for rank in range(2)]
    listener.close()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers; put back for the tests after this one
    try:
        reference = train_two_layers(None)
        one_worker = train_two_layers(World())
        pool = MicroBatchPool(2)
        side_by_side = train_two_layers(World(), pool)
        pool.close()
    finally:
        torch.set_num_threads(threads)
    outputs = [worker.communicate(timeout=300) for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs
    two_workers = json.loads(outputs[0][0])

    # What one process does: the window that never reaches `second` leaves its .grad None, and
    # AdamW leaves it, its moments and its step count alone; weight decay would have moved it.
    assert reference[1]["grads"]["second"] is None and reference[1]["grads"]["first"] is not None
    assert reference[1]["weights"]["second"] == reference[0]["weights"]["second"]
    assert reference[1]["weights"]["first"] != reference[0]["weights"]["first"]
    assert reference[2]["steps"] == {"first": 3, "second": 2}
    # Every world size: the same gradients (None included) and the same weights after every step.
    assert one_worker == reference
    assert side_by_side == reference  # two micro-batches at a time on two threads
    assert two_workers == reference


# --------------------------------------------------------------------------- a window of prompts only

STEPS_2_WINDOW = {"batch_size": 4, "gradient_accumulation_steps": 2, "seed": 42}


def write_data_with_a_prompt_only_window(path: Path, lines: int = 20) -> None:
    """Alpaca rows, where those that step 2's micro-batches draw (data order and the eval split
    are pure functions of the seed) have a prompt longer than data.max_length: truncated, they
    keep no completion token. The others are short and labelled."""
    batch, accumulation, seed = (STEPS_2_WINDOW[key] for key in ("batch_size", "gradient_accumulation_steps", "seed"))
    train_ids, _ = split_indices(lines, 0.1, seed)
    prompt_only = {train_ids[i] for k in range(accumulation, 2 * accumulation)
                   for i in micro_batch_indices(len(train_ids), batch, seed, k)}
    long_prompt = " ".join(f"word{i}" for i in range(200))
    rows = [{"instruction": f"Repeat: {long_prompt}", "input": "", "output": "cut off"} if line in prompt_only
            else {"instruction": f"Say number {line}.", "input": "", "output": f"The number is {line}."}
            for line in range(lines)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _deterministic_files(run_dir: Path) -> dict[str, str]:
    files = load_manifest(run_dir)["files"]
    return {name: entry["sha256"] for name, entry in files.items() if entry["kind"] == "deterministic"}


def test_a_window_of_prompts_only_steps_the_same_at_one_and_two_workers(tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    write_data_with_a_prompt_only_window(data)
    settings = {"training.max_steps": 3, "training.warmup_steps": 0, "training.trace_every": 1,
                "training.eval_steps": 3, "training.save_steps": 3, "training.weight_decay": 0.1,
                "training.sample_max_new_tokens": 4, "data.path": str(data), "data.max_length": 48,
                **{f"training.{key}": value for key, value in STEPS_2_WINDOW.items()}}
    overrides = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    runs = {workers: tmp_path / f"workers-{workers}" for workers in (1, 2)}
    results = run_clis(*(["train", "--config", str(TINY_CONFIG), "--output-dir", str(out), "--threads", "1",
                          "--workers", str(workers), *overrides] for workers, out in runs.items()))
    for result in results:
        assert result.returncode == 0, result.stdout + result.stderr
        assert_no_traceback(result)
    assert [read_json(out / "env.json")["workers"] for out in runs.values()] == [1, 2]
    traces = {workers: [json.loads(line) for line in (out / "trace.jsonl").read_text().splitlines()]
              for workers, out in runs.items()}
    assert traces[1] == traces[2]
    assert _deterministic_files(runs[1]) == _deterministic_files(runs[2])

    first, empty, third = traces[1]
    assert first["target_tokens"] > 0 and third["target_tokens"] > 0
    # Step 2 has no labelled token: loss 0, every gradient an exact zero (norm 0.0)...
    assert (empty["target_tokens"], empty["loss_bits"], empty["grad_norm_bits"]) == (0, "0x0.0p+0", "0x0.0p+0")
    # ...and AdamW steps on them: the moments of step 1 and the weight decay move the adapter.
    assert empty["lora_sha256"] != first["lora_sha256"]
