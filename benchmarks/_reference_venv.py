"""recsys-recoder 0.4.0 in a virtual environment of its own, and running jobs in it.

The environment lives in the benchmark cache (``~/.cache/recoder_dist/bench/...``), never in
this project's dependencies. It borrows this interpreter's packages (torch, numpy, scipy)
through a ``.pth`` file, so both sides run the same torch build and pip never downloads a
torch (a CUDA wheel is several GB); only recsys-recoder (``--no-deps``: it pins torch 1.8)
and its small pure dependencies are installed, then the two edits that current scipy/numpy
need are applied to the installed files: ``scipy.sparse.sputils`` -> ``scipy.sparse._sputils``
and ``np.int`` -> ``int``.
"""

from __future__ import annotations

import json
import os
import re
import site
import subprocess
import sys
import venv
from pathlib import Path

from _common import CACHE

VENV = CACHE / "recoder-0.4.0-venv"
JOB = Path(__file__).with_name("_reference_job.py")
PACKAGES = ["recsys-recoder==0.4.0", "glog==0.3.1", "python-gflags", "annoy", "tqdm"]
EDITS = {  # file -> (pattern, replacement)
    "data.py": (r"scipy\.sparse\.sputils", "scipy.sparse._sputils"),
    "metrics.py": (r"\bnp\.int\b", "int"),
}


def reference_python() -> str:
    """The interpreter of the recsys-recoder environment, created on first use (~1 min)."""
    python = VENV / "bin" / "python"
    ready = VENV / ".ready"
    if ready.exists():
        return str(python)
    print(f"creating {VENV} (recsys-recoder 0.4.0, once) ...", flush=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    purelib = _purelib(python)
    # Our packages after the environment's own: recsys-recoder's edited files come first.
    Path(purelib, "_recoder_dist_bench_host.pth").write_text(
        "\n".join(site.getsitepackages()) + "\n"
    )
    pip = [str(python), "-m", "pip", "install", "--quiet", "--no-deps"]
    subprocess.run(pip + PACKAGES, check=True)
    for name, (pattern, replacement) in EDITS.items():
        path = Path(purelib, "recoder", name)
        text, count = re.subn(pattern, replacement, path.read_text())
        if count == 0:
            raise RuntimeError(f"compatibility edit {pattern!r} found nothing in {path}")
        path.write_text(text)
    ready.write_text("recsys-recoder 0.4.0 with the sputils and np.int edits\n")
    return str(python)


def _purelib(python: Path) -> str:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return subprocess.run(
        [str(python), "-c", code], check=True, capture_output=True, text=True
    ).stdout.strip()


def run_reference(job: dict, threads: int) -> dict:
    """Runs ``job`` (see ``_reference_job.py``) in the recsys-recoder environment; returns its
    result. Timings are taken inside the subprocess: interpreter start is not counted."""
    env = dict(
        os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads)
    )
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [reference_python(), str(JOB), json.dumps(dict(job, threads=threads))],
        capture_output=True,
        text=True,
        env=env,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    sys.stderr.write(proc.stderr[-4000:])
    raise RuntimeError(f"the recsys-recoder job failed (exit {proc.returncode})")
