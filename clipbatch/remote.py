"""The entry point of a job submitted to a cluster: checks the cluster's Python first, then runs the CLI.

Standard library only, so that a cluster whose ``python`` lacks clipbatch's
dependencies (a head started from a virtualenv that is not on its PATH) gets one
line naming what is missing and how to fix it, instead of an import traceback.
"""

from __future__ import annotations

import importlib.util
import sys

# Import names of what a job imports, with the package to install where they differ.
REQUIRED = {"yaml": "pyyaml", "pydantic": "pydantic", "numpy": "numpy", "PIL": "pillow", "pyarrow": "pyarrow",
            "fsspec": "fsspec", "torch": "torch", "open_clip": "open_clip_torch", "ray": "ray[data]",
            "braceexpand": "braceexpand"}


def missing_packages() -> list[str]:
    """Packages whose module cannot be found (a folder of that name, such as /tmp/ray, does not count)."""
    return [package for module, package in REQUIRED.items()
            if getattr(importlib.util.find_spec(module), "origin", None) is None]


def main() -> int:
    missing = missing_packages()
    if missing:
        print(f"clipbatch: error: the cluster's Python ({sys.executable}) lacks {', '.join(missing)}; install "
              "clipbatch there (pip install clipbatch, in the environment whose python the Ray nodes run), or "
              "start the cluster from the image in cluster/", file=sys.stderr, flush=True)
        return 2
    from clipbatch.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
