"""Wall time of ``recoder-dist prepare --dataset events`` and ``recoder-dist recommend``, for
two checkouts of the package side by side (rounds of A B).

    git archive <commit> recoder_dist | tar -x -C /tmp/before
    python benchmarks/io_commands.py --before /tmp/before --rounds 3

Each command is a fresh process that starts its own local Ray, as on one machine (its start is
in the time); each run writes to a fresh folder. The input is ml-1m's interactions.csv (1,000,209
events); ``recommend`` scores the training part (k=100) with a model trained here for one epoch
(in this process, by the newer checkout).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks._common import DATA  # noqa: E402
from tests.multinode import VENV_BIN, client_env  # noqa: E402


def _timed(argv: list[str], code: Path) -> float:
    env = dict(client_env(), PYTHONPATH=str(code))
    start = time.perf_counter()
    result = subprocess.run(argv, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{argv} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="a checkout holding recoder_dist/")
    parser.add_argument("--after", default=str(REPO))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    source = DATA / "ml-1m-implicit" / "interactions.csv"
    cli = str(VENV_BIN / "recoder-dist")
    work = Path(tempfile.mkdtemp(prefix="rdio-", dir="/tmp"))
    prepared = work / "prepared"
    prepare = [cli, "prepare", "--dataset", "events", "--input", str(source)]
    prepare += ["--val-users", "300", "--test-users", "300"]
    _timed([*prepare, "--output", str(prepared)], Path(args.after))
    train = [cli, "train", "--data", str(prepared), "--checkpoint-dir", str(work / "ck")]
    _timed([*train, "--epochs", "1", "--workers", "0"], Path(args.after))
    checkpoint = str(work / "ck" / "model_epoch_1.model")
    recommend = [cli, "recommend", "--checkpoint", checkpoint, "--data", str(prepared)]
    recommend += ["--split", "train", "--top-k", "100"]
    times = {(c, v): [] for c in ("prepare", "recommend") for v in ("before", "after")}
    for round_ in range(args.rounds):
        for variant in ("before", "after"):
            code = Path(getattr(args, variant))
            out = work / f"{variant}-{round_}"
            times["prepare", variant].append(
                _timed([*prepare, "--output", str(out / "prep")], code)
            )
            times["recommend", variant].append(
                _timed([*recommend, "--output", str(out / "recs")], code)
            )
            print(json.dumps({"round": round_, "variant": variant, **{
                c: round(times[c, variant][-1], 2) for c in ("prepare", "recommend")
            }}), flush=True)  # fmt: skip
    print(f"load average at the end: {os.getloadavg()}")
    print("| command | checkout | median s | min s | max s | runs |")
    print("|---|---|---|---|---|---|")
    for (command, variant), seconds in times.items():
        print(
            f"| {command} | {variant} | {statistics.median(seconds):.2f} | "
            f"{min(seconds):.2f} | {max(seconds):.2f} | {len(seconds)} |"
        )


if __name__ == "__main__":
    main()
