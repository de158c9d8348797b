"""Benchmark the real model: SmolLM2-135M LoRA, our loop vs HF Trainer, share of matmul peak, a loss lever.

Workload: `src/qlorax/presets/smollm2-lora.yaml` (SmolLM2-135M-Instruct, chat data, loss on
assistant turns only, LoRA r=8 on all attention/MLP projections) with `--steps` steps
(default 4), `--batch-size` (2) and `--max-length` (160); in-loop eval and checkpoints off.
The base model must already be materialised under $QLORAX_HOME (`qlorax model path
qlorax/smollm2-135m-instruct`). Every measured workload runs in a fresh child of this script
whose environment is `qlorax.determinism.child_environment(os.environ, profile, threads)`,
exactly what the launcher gives `qlorax train` (default: profile strict, 2 threads).

  ours    qlorax.train.set_up + train_loop (the code `qlorax train` runs), then
          write_informational_artifacts: tokens/s and peak RSS come from the run's own
          training_metadata.json. The final eval and the sample generation of a full run are
          skipped (they are not part of the loop's tokens/s; on 2 cores they take minutes).
  hf      HF Trainer + PEFT, TrainingArguments(full_determinism=True, use_cpu=True): the same
          model, LoRA wrap, batches (our micro_batch_indices order, our collate), lr, warmup,
          AdamW, clipping and steps (bench_train.py's comparison, generalised to a config).
  peak    torch.matmul of two --matmul-size square fp32 matrices, best of 6: GFLOP/s = 2n^3/s.
  lever   one forward+backward of the first training batch through the PEFT model, loss
          (a) logits at every position (the loss before the lever was adopted, as HF's
          models compute it) vs (b) qlorax.loss.summed_token_loss, lm_head only at the
          positions with a label; timed alternately, and the loss bits and a SHA-256 of
          the LoRA gradients at 1 and at 2 threads.

Achieved FLOP/s of our loop, per non-pad token (N_frozen = weights of every frozen matmul,
lm_head included, embedding lookup excluded; N_lora = LoRA parameters; L layers, d = attention
width, T the sequence's non-pad length):

    4 * N_frozen        forward (2N) + backward through the activations (2N); no weight grads
  + 6 * N_lora          forward, activation grads and weight grads of the adapters
  + 12 * L * d * T      attention scores and weighted sum (QK^T, AV), forward + backward

divided by the loop's wall time. Padding is not counted (conservative).

    .venv/bin/python bench/bench_real.py [--steps 4] [--threads 2] [--profile strict] [--repeats 1]
        [--batch-size 2] [--max-length 160] [--matmul-size 2048] [--lever-reps 2] [--full-train] [--keep DIR]

The last line of output is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import qlorax_cli, run_matched_hf_trainer
from bench_train import run_logged, utc_epoch
from qlorax.layout import METADATA

PRESET = Path(__file__).resolve().parent.parent / "src" / "qlorax" / "presets" / "smollm2-lora.yaml"
TARGET_OURS_OVER_HF = 1.2
TARGET_PEAK_SHARE = 0.35
LEVER_WORTH = 1.10  # (b), adopted, must stay >10% faster than (a)


# --------------------------------------------------------------------------- shared (both sides)


def overrides(steps: int, batch_size: int, max_length: int, workers: int = 1) -> dict[str, dict[str, Any]]:
    """The workload on top of the preset: steps, batch, length; in-loop eval and checkpoints off.
    With `workers` W > 1 a step is W micro-batches of batch_size / W (the same effective batch),
    so that W data-parallel workers get one each; every variant then trains this config."""
    return {"training": {"max_steps": steps, "warmup_steps": min(1, steps), "batch_size": batch_size // workers,
                         "gradient_accumulation_steps": workers, "eval_steps": steps, "save_steps": steps + 1,
                         "sample_max_new_tokens": 1},
            "data": {"max_length": max_length}}


def load_workload(args: argparse.Namespace) -> Any:
    from qlorax.config import load_config

    return load_config(args.config, overrides(args.steps, args.batch_size, args.max_length, args.workers))


def rss_mb() -> float:
    """Current resident memory of this process in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def grad_digest(model: Any) -> str:
    """SHA-256 of every trainable parameter's gradient bytes, in name order."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if param.requires_grad and param.grad is not None:
            digest.update(name.encode())
            digest.update(param.grad.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def full_logits_loss(model: Any, batch: dict[str, Any]) -> Any:
    """Lever (a), the loss before the lever was adopted: lm_head and log-softmax at every position."""
    import torch.nn.functional as F

    from qlorax.data import IGNORE_INDEX

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1, :].reshape(-1, logits.shape[-1]).float(),
                           batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


def flop_model(model: Any) -> dict[str, int]:
    """Matmul weights of the frozen path and of the adapters, and the attention geometry."""
    import torch

    frozen = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad and ".lora_" not in name)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cfg = model.get_base_model().config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}
    return {"frozen_matmul_params": frozen, "lora_params": lora, "layers": cfg.num_hidden_layers,
            "attention_width": cfg.num_attention_heads * head_dim, "total_params": sum(unique.values()),
            "vocab": cfg.vocab_size, "hidden": cfg.hidden_size}


def stream_lengths(cfg: Any, train: list[Any], pad_id: int) -> list[list[int]]:
    """Non-pad length of every sequence of every micro batch the loop draws, per micro batch."""
    from qlorax.data import collate, micro_batch_indices

    tcfg = cfg.training
    out = []
    for k in range(tcfg.max_steps * tcfg.gradient_accumulation_steps):
        batch = collate([train[i] for i in micro_batch_indices(len(train), tcfg.batch_size, tcfg.seed, k)], pad_id)
        out.append([int(n) for n in batch["attention_mask"].sum(dim=1)])
    return out


def useful_flops(dims: dict[str, int], lengths: list[list[int]]) -> float:
    """4*N_frozen + 6*N_lora per token plus 12*L*d*T per token of attention (see the docstring)."""
    per_token = 4 * dims["frozen_matmul_params"] + 6 * dims["lora_params"]
    total = 0.0
    for batch in lengths:
        for length in batch:
            total += length * per_token + 12 * dims["layers"] * dims["attention_width"] * length * length
    return total


# --------------------------------------------------------------------------- children


def child_ours(args: argparse.Namespace) -> dict[str, Any]:
    """set_up + train_loop + write_informational_artifacts: the loop of `qlorax train`."""
    from qlorax.artifacts import utc_now
    from qlorax.run_outputs import write_informational_artifacts
    from qlorax.train import TrainingJob, _StopFlag, set_up, train_loop

    rss_start = rss_mb()
    import torch  # noqa: F401 - measured: the runtime's own memory
    import transformers  # noqa: F401
    rss_runtime = rss_mb()
    cfg = load_workload(args)
    args.workdir.mkdir(parents=True, exist_ok=True)
    started_at, wall_start = utc_now(), time.perf_counter()
    state = set_up(TrainingJob(config=cfg, output_dir=args.workdir, threads=args.threads))
    rss_loaded = rss_mb()
    train_loop(state, _StopFlag(), None)
    write_informational_artifacts(state, started_at, wall_start)
    meta = json.loads((args.workdir / METADATA).read_text())
    dims = flop_model(state.model)
    lengths = stream_lengths(cfg, state.data.train, state.tokenizer.pad_token_id)
    return {"tokens_per_second": meta["tokens_per_second"], "train_seconds": meta["training_duration_seconds"],
            "tokens": state.loop_tokens, "peak_memory_mb": meta["peak_memory_mb"], "started_at": meta["started_at"],
            "rss_start_mb": round(rss_start, 1), "rss_runtime_mb": round(rss_runtime, 1),
            "rss_loaded_mb": round(rss_loaded, 1), "final_loss": state.progress.recent_losses[-1],
            "useful_flops": useful_flops(dims, lengths), "padded_tokens": sum(len(b) * max(b) for b in lengths),
            "dims": dims, "torch_threads": torch.get_num_threads()}


def child_hf(args: argparse.Namespace) -> dict[str, Any]:
    """HF Trainer + PEFT on the same workload (bench/_common.run_matched_hf_trainer)."""
    import warnings

    warnings.filterwarnings("ignore")
    cfg = load_workload(args)
    return run_matched_hf_trainer(cfg, cfg.training.max_steps, args.workdir)


def child_peak(args: argparse.Namespace) -> dict[str, Any]:
    """fp32 matmul throughput: best of 6 products of two n x n matrices (after one warm-up)."""
    import torch

    n = args.matmul_size
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    torch.matmul(a, b)
    times = []
    for _ in range(6):
        start = time.perf_counter()
        torch.matmul(a, b)
        times.append(time.perf_counter() - start)
    return {"gflops_best": round(2 * n**3 / min(times) / 1e9, 1),
            "gflops_median": round(2 * n**3 / statistics.median(times) / 1e9, 1),
            "torch_threads": torch.get_num_threads(), "n": n}


def child_lever(args: argparse.Namespace) -> dict[str, Any]:
    """Forward+backward of the first training batch with loss (a) full logits, (b) gathered rows."""
    import torch

    from qlorax.data import IGNORE_INDEX, collate, micro_batch_indices
    from qlorax.loss import summed_token_loss
    from qlorax.train import TrainingJob, set_up

    cfg = load_workload(args)
    args.workdir.mkdir(parents=True, exist_ok=True)
    state = set_up(TrainingJob(config=cfg, output_dir=args.workdir, threads=args.threads))
    model, tcfg = state.model, cfg.training
    train = state.data.train
    batch = collate([train[i] for i in micro_batch_indices(len(train), tcfg.batch_size, tcfg.seed, 0)],
                    state.tokenizer.pad_token_id)
    labels = batch["labels"][:, 1:]
    variants = {"a": full_logits_loss, "b": summed_token_loss}
    seen: dict[str, dict[str, Any]] = {name: {"seconds": [], "bits": set()} for name in variants}

    def once(name: str) -> float:
        model.zero_grad(set_to_none=True)
        state.dropout.begin(0)  # the same dropout masks for both variants
        start = time.perf_counter()
        loss = variants[name](model, batch)
        loss.backward()
        seconds = time.perf_counter() - start
        seen[name]["bits"].add((float(loss).hex(), grad_digest(model)))
        seen[name]["loss"] = float(loss)
        return seconds

    once("a"), once("b")  # warm-up
    order = ["a", "b", "b", "a"] * args.lever_reps
    for name in order:
        seen[name]["seconds"].append(once(name))
    out: dict[str, Any] = {"torch_threads": torch.get_num_threads(), "positions": int(labels.numel()),
                           "labelled": int((labels != IGNORE_INDEX).sum()),
                           "input_tokens": int(batch["attention_mask"].sum()),
                           "shape": list(batch["input_ids"].shape)}
    for name, record in seen.items():
        bits = sorted(record["bits"])
        out[name] = {"seconds": [round(s, 3) for s in record["seconds"]],
                     "median_seconds": round(statistics.median(record["seconds"]), 3),
                     "loss": record["loss"], "loss_bits": bits[0][0], "grad_sha256": bits[0][1],
                     "repeatable": len(bits) == 1}
    return out


CHILDREN = {"ours": child_ours, "hf": child_hf, "peak": child_peak, "lever": child_lever}


# --------------------------------------------------------------------------- parent side


def run_child(kind: str, args: argparse.Namespace, root: Path, tag: str, threads: int,
              env: dict[str, str]) -> dict[str, Any]:
    """One measured workload in a fresh child with the launcher's pinned environment."""
    from qlorax.determinism import child_environment

    child_env, _ = child_environment(env, args.profile, threads)
    out = root / "runs" / f"{tag}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--result", str(out),
           "--workdir", str(root / "runs" / tag), "--config", str(args.config), "--threads", str(threads),
           "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
           "--matmul-size", str(args.matmul_size), "--lever-reps", str(args.lever_reps),
           "--profile", args.profile, "--workers", str(args.workers)]
    wall, foreign = run_logged(cmd, child_env, root / "logs" / f"{tag}.log")
    result = json.loads(out.read_text())
    if result["torch_threads"] != threads:
        raise SystemExit(f"{tag}: ran on {result['torch_threads']} threads, not {threads}")
    result["wall_seconds"] = round(wall, 1)
    result["foreign_load"] = foreign
    print(f"  {tag:14s} done in {wall:6.1f} s (foreign load {foreign} cores)", flush=True)
    return result


def cli_train(args: argparse.Namespace, root: Path, env: dict[str, str], tag: str, workers: int = 1
              ) -> dict[str, Any]:
    """One complete `qlorax train` of the workload (final eval and samples included), `workers`
    data-parallel workers of threads / workers threads each; numbers from its run directory."""
    run_dir = root / "runs" / tag
    sets = [f"{section}.{key}={value}" for section, values in overrides(args.steps, args.batch_size,
                                                                         args.max_length, args.workers).items()
            for key, value in values.items()]
    cmd = [*qlorax_cli(), "train", "-c", str(args.config), "-o", str(run_dir), "--force", "--profile",
           args.profile, "--threads", str(max(1, args.threads // workers)), "--workers", str(workers),
           *[x for s in sets for x in ("--set", s)]]
    launched = time.time()
    wall, foreign = run_logged(cmd, env, root / "logs" / f"{tag}.log")
    meta = json.loads((run_dir / METADATA).read_text())
    if utc_epoch(meta["started_at"]) < launched:
        raise SystemExit(f"{run_dir}: training_metadata.json predates this run")
    manifest = json.loads((run_dir / "artifact_summary.json").read_text())
    print(f"  {tag:14s} done in {wall:6.1f} s (foreign load {foreign} cores)", flush=True)
    return {"wall_seconds": round(wall, 1), "foreign_load": foreign, "peak_memory_mb": meta["peak_memory_mb"],
            "tokens_per_second": meta["tokens_per_second"], "train_seconds": meta["training_duration_seconds"],
            "collective_seconds": meta.get("collective_seconds"),
            "tokens": json.loads((run_dir / "results.json").read_text())["train_tokens"],
            "adapter_sha256": manifest["files"]["adapter_model.safetensors"]["sha256"]}


def verdict(value: float, target: float) -> str:
    return f"target >= {target}: {'PASS' if value >= target else 'FAIL'}"


def report(args: argparse.Namespace, res: dict[str, Any], loads: tuple[Any, Any]) -> None:
    """The tables, the numbers against their targets, one line of JSON."""
    limit = args.busy_limit
    mark = {True: "*", False: ""}

    def busy(run: dict[str, Any]) -> str:
        return mark[run.get("foreign_load") is not None and run["foreign_load"] > limit]

    ours, hf = res["ours"], res["hf"]
    print()
    print(f"workload: {args.config.name}, {args.steps} steps, batch {args.batch_size}, max_length "
          f"{args.max_length}, profile {args.profile}, {args.threads} threads")
    print(f"{'run':10s} {'tok/s':>8s} {'loop s':>8s} {'tokens':>7s} {'foreign load':>13s}")
    ratios = []
    for i, (o, h) in enumerate(zip(ours, hf, strict=True)):
        for name, run in (("ours", o), ("hf", h)):
            print(f"{name}-{i + 1:<5d} {run['tokens_per_second']:8.1f} {run['train_seconds']:8.1f} "
                  f"{run['tokens']:7d} {str(run['foreign_load']) + busy(run):>13s}")
        ratios.append(o["tokens_per_second"] / h["tokens_per_second"])
    ratio = statistics.median(ratios)
    if {o["tokens"] for o in ours} != {h["tokens"] for h in hf}:
        print("warning: ours and hf processed different token counts")
    print(f"ours/hf tokens/s: {ratio:.3f} (per repeat {', '.join(f'{r:.3f}' for r in ratios)})  "
          f"{verdict(ratio, TARGET_OURS_OVER_HF)}")
    dp_ratio = None
    if res.get("dp"):
        dp_ratios = [d["tokens_per_second"] / h["tokens_per_second"] for d, h in zip(res["dp"], hf, strict=True)]
        dp_ratio = statistics.median(dp_ratios)
        for i, run in enumerate(res["dp"]):
            print(f"dp-{i + 1:<7d} {run['tokens_per_second']:8.1f} {run['train_seconds']:8.1f} {run['tokens']:7d} "
                  f"{str(run['foreign_load']) + busy(run):>13s}  ({args.workers} workers x "
                  f"{max(1, args.threads // args.workers)} thread, collective {run['collective_seconds']} s)")
        print(f"ours with {args.workers} workers / hf at {args.threads} threads: {dp_ratio:.3f} (per repeat "
              f"{', '.join(f'{r:.3f}' for r in dp_ratios)})  {verdict(dp_ratio, TARGET_OURS_OVER_HF)}; adapter digests "
              f"of the data-parallel runs: {len({d['adapter_sha256'] for d in res['dp']})} distinct")

    peak, dims = res["peak"], ours[0]["dims"]
    achieved = [o["useful_flops"] / o["train_seconds"] / 1e9 for o in ours]
    share = statistics.median(achieved) / peak["gflops_best"]
    print()
    print(f"matmul peak ({peak['n']}^2 fp32, {args.threads} threads, {args.profile} pins): "
          f"best {peak['gflops_best']} GFLOP/s, median {peak['gflops_median']}{busy(peak)}")
    print(f"FLOPs/token = 4*N_frozen + 6*N_lora + 12*L*d*T: N_frozen={dims['frozen_matmul_params'] / 1e6:.1f}M "
          f"(lm_head {dims['vocab'] * dims['hidden'] / 1e6:.1f}M of it), N_lora={dims['lora_params'] / 1e6:.2f}M, "
          f"L={dims['layers']}, d={dims['attention_width']}")
    print(f"our loop: {statistics.median(achieved):.1f} GFLOP/s useful = {share:.1%} of peak  "
          f"{verdict(round(share, 3), TARGET_PEAK_SHARE)}  (padding not counted: "
          f"{ours[0]['tokens']} non-pad of {ours[0]['padded_tokens']} computed positions)")

    lever = res["lever"]
    one, two = lever["1"], lever[str(args.threads)]
    speed = two["a"]["median_seconds"] / two["b"]["median_seconds"]
    print()
    print(f"lever: logits only at labelled positions ({two['labelled']} of {two['positions']} shifted positions "
          f"labelled, batch {two['shape']}, vocab {dims['vocab']})")
    print(f"{'threads':>7s} {'(a) full s':>10s} {'(b) gathered s':>14s} {'a/b':>6s}  {'(a) loss bits':22s} "
          f"{'(b) loss bits':22s} {'grads a==b':>10s}")
    rows = [("1", one)] + ([(str(args.threads), two)] if args.threads != 1 else [])
    for threads, run in rows:
        print(f"{threads:>7s} {run['a']['median_seconds']:10.3f} {run['b']['median_seconds']:14.3f} "
              f"{run['a']['median_seconds'] / run['b']['median_seconds']:6.3f}  {run['a']['loss_bits']:22s} "
              f"{run['b']['loss_bits']:22s} {str(run['a']['grad_sha256'] == run['b']['grad_sha256']):>10s}"
              f"{busy(run)}")
    same = {v: one[v]["loss_bits"] == two[v]["loss_bits"] and one[v]["grad_sha256"] == two[v]["grad_sha256"]
            for v in ("a", "b")}
    repeatable = all(run[v]["repeatable"] for run in (one, two) for v in ("a", "b"))
    across = (f"1 vs {args.threads} threads bit-identical (loss and LoRA grads): (a) {same['a']}, (b) {same['b']}"
              if args.threads != 1 else "thread invariance not tested (--threads 1)")
    print(f"{across}; every repetition within a run identical: {repeatable}")
    print(f"(b) loss == (a) loss bits: {two['a']['loss_bits'] == two['b']['loss_bits']} (|diff| "
          f"{abs(two['a']['loss'] - two['b']['loss']):.3g}); (b) speed-up at {args.threads} threads: {speed:.3f}x "
          f"({'worth it' if speed > LEVER_WORTH and same['b'] and args.threads != 1 else 'not shown worth it'}: "
          f"needs > {LEVER_WORTH} and bits shown thread-invariant)")

    o = ours[0]
    weights = dims["total_params"] * 4 / 2**20
    lora_state = dims["lora_params"] * 4 * 4 / 2**20  # param, grad, exp_avg, exp_avg_sq
    logits = args.batch_size * args.max_length * dims["vocab"] * 4 / 2**20
    print()
    print(f"memory (MiB): peak RSS of the loop {o['peak_memory_mb']:.0f} (training_metadata.json)"
          + (f"; of a full `qlorax train` (final eval, samples) {res['full']['peak_memory_mb']:.0f}"
             if res.get("full") else ""))
    print(f"  python + torch + transformers imported {o['rss_runtime_mb']:.0f}; after set_up (model, data, LoRA) "
          f"{o['rss_loaded_mb']:.0f}; growth during the loop {o['peak_memory_mb'] - o['rss_loaded_mb']:.0f}")
    print(f"  estimates: fp32 weights {dims['total_params'] / 1e6:.1f}M x 4 B = {weights:.0f}; LoRA + grads + "
          f"AdamW {lora_state:.0f}; one full-logit tensor (batch x max_length x vocab x 4 B) {logits:.0f} "
          f"(the loss keeps ~3: logits, log-softmax, their grad); the rest activations and allocator")
    print(f"* = the rest of the machine used more than {limit} cores during the run")
    print(f"load average before {[round(x, 2) for x in loads[0]]}, after {[round(x, 2) for x in loads[1]]} on "
          f"{os.cpu_count()} CPUs")
    print(json.dumps({"args": {k: str(v) for k, v in vars(args).items() if k not in ("child", "result", "workdir")},
                      "ours_over_hf": round(ratio, 3),
                      "dp_over_hf": round(dp_ratio, 3) if dp_ratio is not None else None,
                      "achieved_gflops": [round(a, 1) for a in achieved],
                      "peak_share": round(share, 3), "lever_speedup": round(speed, 3),
                      "lever_thread_invariant": same, **res}, sort_keys=True, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=PRESET)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", default="strict")
    parser.add_argument("--repeats", type=int, default=1, help="ours/hf pairs")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=160)
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--lever-reps", type=int, default=2, help="rounds of a,b,b,a timings per thread count")
    parser.add_argument("--full-train", action="store_true", help="also one complete `qlorax train` (peak RSS)")
    parser.add_argument("--workers", type=int, default=1, help="W > 1: every variant trains W micro-batches of "
                        "batch-size / W per step, and a third variant runs `qlorax train --workers W`")
    parser.add_argument("--busy-limit", type=float, default=0.2)
    parser.add_argument("--keep", type=Path, default=None, help="work here (runs, logs) and keep it")
    parser.add_argument("--replay", type=Path, default=None, help="print the report of a kept run's results.json")
    parser.add_argument("--child", choices=sorted(CHILDREN), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        result = CHILDREN[args.child](args)
        result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        args.result.write_text(json.dumps(result))
        return

    if args.replay:
        saved = json.loads(args.replay.read_text())
        report(args, saved["res"], (saved["loads"][0], saved["loads"][1]))
        return
    if "QLORAX_HOME" not in os.environ:
        raise SystemExit("set QLORAX_HOME to where the smollm2 preset is materialised "
                         "(`qlorax model path qlorax/smollm2-135m-instruct`)")
    args.config = args.config.resolve()
    keep = args.keep.resolve() if args.keep else None
    root = keep or Path(tempfile.mkdtemp(prefix="qlorax-bench-real-"))
    (root / "logs").mkdir(parents=True, exist_ok=True)
    (root / "runs").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "QLORAX_CACHE": "off", "QLORAX_CACHE_DIR": str(root / "cache")}
    load_before = os.getloadavg()
    res: dict[str, Any] = {"ours": [], "hf": []}
    try:
        res["peak"] = run_child("peak", args, root, "peak", args.threads, env)
        for repeat in range(args.repeats):
            pair = [("ours", child_ours), ("hf", child_hf)][:: 1 if repeat % 2 == 0 else -1]
            for kind, _ in pair:
                res[kind].append(run_child(kind, args, root, f"{kind}-{repeat + 1}", args.threads, env))
            if args.workers > 1:
                res.setdefault("dp", []).append(cli_train(args, root, env, f"dp-{repeat + 1}", args.workers))
        res["lever"] = {str(t): run_child("lever", args, root, f"lever-{t}t", t, env)
                        for t in sorted({1, args.threads})}
        if args.full_train:
            res["full"] = cli_train(args, root, env, "full-train")
        loads = (load_before, os.getloadavg())
        (root / "results.json").write_text(json.dumps({"res": res, "loads": loads}))
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)
    report(args, res, loads)


if __name__ == "__main__":
    main()
