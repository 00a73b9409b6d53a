"""A variant that is deliberately unfit: a built folder with its embedding rows shuffled (a fixed seed). It loads
and generates on every CPU and GPU, in every dtype, and its words have nothing to do with the original's: what
a broken kernel or a wrong dtype looks like from outside (STACK.md, quirk 10). The integration test of a stack
with an unfit candidate and `loadtests/verification.py` use it to show that the verification catches it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

SEED = 7


def garble(folder: Path, out: Path) -> Path:
    """Copies `folder` to `out` with the rows of its token embedding (and output head, if separate) shuffled."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(folder, out)
    generator = torch.Generator().manual_seed(SEED)
    for weights in sorted(out.glob("*.safetensors")):
        tensors = load_file(weights)
        for name in [n for n in tensors if "embed_tokens" in n or n.startswith("lm_head")]:
            rows = tensors[name]
            tensors[name] = rows[torch.randperm(rows.shape[0], generator=generator)].contiguous()
        save_file(tensors, weights, metadata={"format": "pt"})
    return out
