"""Run a notebook top to bottom in a fresh Jupyter kernel and save it with its outputs.

    python notebooks/execute.py notebooks/quickstart.ipynb              # outputs saved in place
    python notebooks/execute.py notebooks/quickstart.ipynb -o run.ipynb # or to another file

The kernel is an IPython kernel on *this* interpreter (a kernelspec written to a temporary
JUPYTER_PATH, so no installed kernelspec can point elsewhere), started in the notebook's folder.
A failing cell stops the run with the cell's traceback (exit status 1). Needs nbclient, nbformat
and ipykernel (``scripts/setup.sh --test`` installs them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def execute(path, output=None, *, timeout: int = 600):
    """Execute the notebook at ``path``; write it (with outputs) to ``output`` when given.
    Returns ``(notebook, seconds)``; raises nbclient's CellExecutionError on a failing cell."""
    import nbformat
    from nbclient import NotebookClient

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    kernelspec = dict(nb.metadata.get("kernelspec", {}))
    with tempfile.TemporaryDirectory(prefix="mixkv-kernel-") as tmp:
        spec = Path(tmp) / "kernels" / "python3"
        spec.mkdir(parents=True)
        (spec / "kernel.json").write_text(json.dumps(dict(
            argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            display_name="Python 3 (ipykernel)", language="python")))
        previous = os.environ.get("JUPYTER_PATH")
        os.environ["JUPYTER_PATH"] = tmp + (os.pathsep + previous if previous else "")
        try:
            client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                    resources={"metadata": {"path": str(path.parent.resolve())}})
            start = time.perf_counter()
            client.execute()
            seconds = time.perf_counter() - start
        finally:
            if previous is None:
                os.environ.pop("JUPYTER_PATH", None)
            else:
                os.environ["JUPYTER_PATH"] = previous
    if kernelspec:
        nb.metadata["kernelspec"] = kernelspec
    nbformat.validate(nb)
    if output is not None:
        nbformat.write(nb, str(output))
    return nb, seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("notebook")
    p.add_argument("-o", "--output", default=None, help="where to save (default: in place)")
    p.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    args = p.parse_args(argv)
    from nbclient.exceptions import CellExecutionError

    try:
        _, seconds = execute(args.notebook, args.output or args.notebook, timeout=args.timeout)
    except CellExecutionError as error:
        print(error, file=sys.stderr)
        return 1
    print(f"executed {args.notebook} in {seconds:.1f} s -> {args.output or args.notebook}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
