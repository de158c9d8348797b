"""Which MKL vector-math (VML) kernels does a training step call, under a profile?

    .venv/bin/python scripts/vml_kernels.py [--profile portable] [--config C] [--threads 1]

Runs the `probe` job (set-up and the first optimizer step of the config, as `qlorax probe`
does, on a 1x16 batch) natively under gdb, in the launcher's pinned child. gdb holds a
breakpoint on every VML entry point torch's libtorch_cpu.so exports (`vsSqrt`, `vmsCos`, ...:
MKL is linked into it, with only the functions ATen's vector math calls); the first hit of each
records its name and removes the breakpoint. MKL_VERBOSE cannot do this: it reports BLAS calls,
not VML ones. (Breaking on MKL's ~670 per-ISA `mkl_vml_kernel_*` functions instead names the
variant too, but takes 8x longer.)

VML's float32 sqrt/sin/cos kernels start from the approximate `rsqrtps`/`rcpps`, whose results
differ between Intel and AMD processors, so the `portable` profile must call none
(tests/test_exact_math.py checks that, and the list under `strict`). Prints the kernels, one per
line, then one JSON object as the last line. Needs gdb (scripts/install_test_services.sh).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# VML's entry points (vsSqrt, vmsSqrt: the mode-taking form ATen calls, and their _64 twins):
# the only VML functions linked into torch are the ones ATen's vector math uses.
KERNEL = re.compile(r"^vm?([sd][A-Z][A-Za-z0-9]*?)(?:_64)?$")

# Runs inside gdb: pending breakpoints on every kernel; on exit, the names hit, as JSON.
GDB_SCRIPT = r'''
import json
import gdb

gdb.execute("set pagination off")
gdb.execute("set breakpoint pending on")
gdb.execute("set print thread-events off")
gdb.execute("set print inferior-events off")
gdb.execute("set startup-with-shell off")
for signal in ("SIGPIPE", "SIGUSR1", "SIGUSR2", "SIGCHLD"):
    gdb.execute(f"handle {signal} nostop noprint pass")
HIT = []


class FirstHit(gdb.Breakpoint):
    def stop(self):
        HIT.append(self.location)
        gdb.post_event(lambda: self.delete() if self.is_valid() else None)
        return False


for name in json.load(open(NAMES_FILE)):
    FirstHit(name, internal=True)


def done(event):
    with open(HITS_FILE, "w") as handle:
        json.dump(sorted(set(HIT)), handle)


gdb.events.exited.connect(done)
'''


def exported_kernels() -> list[str]:
    """The VML entry points libtorch_cpu.so exports."""
    import torch

    library = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    listing = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True,
                             check=True).stdout
    return sorted({parts[-1] for parts in map(str.split, listing.splitlines())
                   if parts and KERNEL.match(parts[-1])})


def trace(profile: str, config_path: Path | None, threads: int, batch: str = "1x16") -> dict[str, object]:
    """Run the probe job under gdb: {"profile", "threads", "kernels": entry points hit, "functions"}."""
    sys.path.insert(0, str(ROOT / "src"))
    from qlorax.config import load_config, parse_config
    from qlorax.launcher import launch_job
    from qlorax.probe import parse_batch, probe_config
    from qlorax.usecases.training import prepare_base_model

    gdb = shutil.which("gdb")
    if gdb is None:
        raise SystemExit("gdb is not installed: run `bash scripts/install_test_services.sh` (installs gdb)")
    config = load_config(config_path) if config_path else parse_config({})
    data = config.canonical()
    data["determinism"]["profile"] = profile
    data["data"]["train_on_inputs"] = True  # every token a target: the short batch has gradients
    config = probe_config(parse_config(data, "vml trace config"), parse_batch(batch))
    prepare_base_model(config)
    with tempfile.TemporaryDirectory(prefix="qlorax-vml-") as scratch:
        names_file, hits_file = Path(scratch) / "names.json", Path(scratch) / "hits.json"
        names_file.write_text(json.dumps(exported_kernels()))
        script = Path(scratch) / "trace.py"
        script.write_text(f"NAMES_FILE = {str(names_file)!r}\nHITS_FILE = {str(hits_file)!r}\n{GDB_SCRIPT}")
        payload = {"config": config.canonical(), "result": str(Path(scratch) / "step")}
        with open(Path(scratch) / "log", "w", encoding="utf-8") as log:
            code = launch_job("probe", payload, profile, threads, stdout=log, stderr=log,
                              wrapper=(gdb, "-q", "-batch", "-nx", "-x", str(script), "-ex", "run", "--args"))
        if not hits_file.is_file():
            raise SystemExit(f"gdb wrote no trace (exit {code}):\n{(Path(scratch) / 'log').read_text()[-3000:]}")
        step_ok = (Path(scratch) / "step.json").is_file()
        if not step_ok:
            raise SystemExit(f"the traced step did not finish (exit {code}):\n"
                             f"{(Path(scratch) / 'log').read_text()[-3000:]}")
        kernels = json.loads(hits_file.read_text())
    return {"profile": profile, "threads": threads, "kernels": kernels,
            "functions": sorted({KERNEL.match(name).group(1) for name in kernels})}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="portable")
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    result = trace(args.profile, args.config, args.threads)
    for name in result["kernels"]:
        print(name)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
