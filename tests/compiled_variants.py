"""How many variants each of the trainer's compiled kernels (numba on CPU, Triton on CUDA)
holds after the trainer's setup and after its training. Run in a fresh process by the warm-up
tests, so that nothing an earlier test compiled counts:

    python tests/compiled_variants.py OVERRIDES...

prints one JSON line: {"setup": {kernel: variants}, "trained": {kernel: variants}}. A variant
that appears during training is a compile inside training's clock that the warm-up missed.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from conftest import prepare

from dist_w2v.config import load_config
from dist_w2v.parallel.env import DistEnv, choose_device
from dist_w2v.train.loop import Trainer

# Imported when used: a module that is not imported has compiled nothing.
COMPILED_MODULES = ("dist_w2v.data.compiled_rows", "dist_w2v.model.fused_cpu",
                    "dist_w2v.train.compiled_updates", "dist_w2v.model.triton_kernel")


def variants() -> dict[str, int]:
    counts = {}
    for module_name in COMPILED_MODULES:
        module = sys.modules.get(module_name)
        for name, kernel in (vars(module) if module else {}).items():
            if hasattr(kernel, "py_func") and hasattr(kernel, "signatures"):  # numba dispatcher
                counts[f"{module_name}.{name}"] = len(kernel.signatures)
            elif hasattr(kernel, "device_caches"):  # triton JITFunction: one cache per device
                counts[f"{module_name}.{name}"] = sum(
                    len(cache[0]) for cache in kernel.device_caches.values())
    return counts


def main(overrides: list[str]) -> None:
    torch.set_num_threads(1)
    cfg = load_config(None, overrides)
    with tempfile.TemporaryDirectory() as work:
        corpus = prepare(cfg.data, Path(work) / "cache")
        env = DistEnv(device=choose_device(cfg.train.device, 0))
        trainer = Trainer(cfg, env, Path(work) / "run", corpus)
        setup = variants()
        trainer.fit()
        print(json.dumps({"setup": setup, "trained": variants()}))


if __name__ == "__main__":
    main(sys.argv[1:])
