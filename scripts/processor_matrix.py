"""The processor matrix: which processors give the native bits under each profile, on this machine.

    .venv/bin/python scripts/processor_matrix.py [--profiles portable,strict]
        [--cpus native,Haswell-v4,EPYC-Rome-v1,Nehalem-v1] [--config C] [--jobs 2] [--output-dir DIR]

For each profile it runs `qlorax probe --profile P --cpu <cpus>` (the first training step of
the config on each processor: native, and QEMU-emulated models through `qemu-x86_64 -cpu`),
reads each probe_report.json and prints one markdown table: profile x processor -> agrees /
differs (how many tensors, max ULP, the likely cause) / refused, with the CPUID model the child
saw. Paste it into your notes (the README's matrix was made this way).
Emulation costs ~100x per step: with the tiny preset and the default 2x32 batch, about 2
minutes per emulated processor. Exit 0 when every probed processor agrees under every profile.
Needs qemu-user (scripts/install_test_services.sh installs it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_CPUS = "native,Haswell-v4,EPYC-Rome-v1,Nehalem-v1"


def probe(profile: str, cpus: str, config: Path | None, jobs: int, output_dir: Path) -> dict[str, Any]:
    cli = Path(sys.executable).with_name("qlorax")
    command = [str(cli) if cli.is_file() else "qlorax", "probe", "--profile", profile, "--cpu", cpus,
               "--jobs", str(jobs), "--output-dir", str(output_dir)]
    if config is not None:
        command += ["--config", str(config)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    report_path = output_dir / "probe_report.json"
    if not report_path.is_file():
        raise SystemExit(f"qlorax probe --profile {profile} wrote no report (exit {done.returncode}):\n"
                         f"{done.stdout}{done.stderr}")
    return json.loads(report_path.read_text(encoding="utf-8"))


def cell(entry: dict[str, Any]) -> str:
    status = entry.get("status", "?")
    comparison = entry.get("comparison") or {}
    if status == "differs":
        return (f"**differs**: {len(comparison.get('tensors_differing', []))} of {comparison.get('tensors_compared')} "
                f"tensors, max {comparison.get('max_ulp_distance')} ULP ({entry.get('likely_cause', 'cause unknown')})")
    if status == "refused":
        return f"refused: {entry.get('message', '')[:90]}"
    return status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profiles", default="portable,strict")
    parser.add_argument("--cpus", default=DEFAULT_CPUS)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--output-dir", type=Path, default=None, help="keep the probe reports here")
    args = parser.parse_args()
    root = args.output_dir or Path(tempfile.mkdtemp(prefix="qlorax-matrix-"))
    lines = ["| profile | processor | CPUID model | result of the first step vs native |",
             "|---|---|---|---|"]
    all_agree = True
    try:
        for profile in args.profiles.split(","):
            report = probe(profile, args.cpus, args.config, args.jobs, root / profile)
            for name, entry in report["processors"].items():
                processor = entry.get("processor") or {}
                lines.append(f"| {profile} | {name} | {processor.get('cpu_model', '')} | {cell(entry)} |")
                all_agree &= entry.get("status") in ("agrees", "reference")
    finally:
        if args.output_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    print("\n".join(lines))
    return 0 if all_agree else 1


if __name__ == "__main__":
    sys.exit(main())
