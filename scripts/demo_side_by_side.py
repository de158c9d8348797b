"""`make demo`'s last step: a few bundled prompts answered by the base model and by the
fine-tuned adapter of a finished run, side by side.

The adapter's answers are the run's own samples.jsonl (greedy, written by training); the base
model's are generated here the same way (same template, greedy), so the difference is the
adapter's doing.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table


def main(run_dir: Path, count: int) -> int:
    os.environ.setdefault("TQDM_DISABLE", "1")  # before transformers loads: no weight-loading bars
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from qlorax.config import parse_config
    from qlorax.generate import generate_completions, read_prompt_records
    from qlorax.layout import CHECKPOINT_CONFIG, CHECKPOINTS_DIR, SAMPLES
    from qlorax.model import load_base_model, resolve_base_model

    config = parse_config(json.loads((run_dir / CHECKPOINTS_DIR / CHECKPOINT_CONFIG).read_text())["config"])
    prompts = read_prompt_records()[:count]
    tokenizer, base = load_base_model(resolve_base_model(config.model), config.model)
    before = generate_completions(base, tokenizer, prompts, fmt=config.data.format)
    after = {s["id"]: s for s in map(json.loads, (run_dir / SAMPLES).read_text().splitlines())}
    table = Table(title=f"{config.model.name_or_path}: base model vs fine-tuned adapter ({run_dir})",
                  show_lines=True)
    table.add_column("prompt", ratio=2)
    table.add_column("base model", ratio=3)
    table.add_column("with the adapter", ratio=3)
    for prompt, base_answer in zip(prompts, before, strict=True):
        table.add_row(prompt["instruction"], base_answer["completion"], after[prompt["id"]]["completion"])
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 3))
