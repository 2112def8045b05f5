"""Test-only script: Axolotl's scripted load path (`load_cfg`, then `axolotl.common.datasets.load_datasets`,
as `axolotl evaluate` and notebooks take it), once per step. Steps: `load`; `edit-template`, which
changes the model folder's chat_template.jinja; `touch-weights`, which rewrites the weights' file date as an
in-place save does. Each load prints `prepared: <n>`, how many prepared datasets there are after it."""

import os
import sys
from pathlib import Path

from axolotl.cli.config import load_cfg
from axolotl.common.datasets import load_datasets


def main(config: str, steps: list[str]) -> None:
    for step in steps:
        if step == "load":
            cfg = load_cfg(config)
            load_datasets(cfg=cfg)
            folders = [
                p
                for p in Path(cfg.dataset_prepared_path).iterdir()
                if p.is_dir() and p.name != "upft_samples"
            ]
            print(f"prepared: {len(folders)}", flush=True)
        elif step == "edit-template":
            template = Path(cfg.base_model) / "chat_template.jinja"
            template.write_text(template.read_text() + "{# edited #}")
        elif step == "touch-weights":
            weights = Path(cfg.base_model) / "model.safetensors"
            os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
        else:
            raise SystemExit(f"unknown step {step!r}")


if __name__ == "__main__":  # Axolotl's worker processes import this module again
    main(sys.argv[1], sys.argv[2:])
