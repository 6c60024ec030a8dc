"""The head-swap loop: `dvc repro select` after a change of `heads.mlp.dropout`, against a full `dvc repro`.

In a temporary clone of this repository (its committed HEAD, no DVC cache, no feature store: nothing is reused),
times a full `dvc repro` (embedded -> prepare -> extract -> heads -> select -> finetune -> evaluate), then sets
`heads.mlp.dropout` to another value `--repeats` times and times `dvc repro select` after each change (DVC reruns
heads@mlp and select only). Prints the machine, the load average around each run (the machine may be shared), each
stage's own time from the clone's run log, both wall times and their ratio.

    python bench/head_swap.py                 # full repro + 3 head swaps
    python bench/head_swap.py --keep DIR      # keep the clone in DIR (to rerun swaps with --reuse DIR)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DROPOUTS = (0.3, 0.4, 0.2)  # heads.mlp.dropout values tried in turn (the default is 0.5)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, nice {os.nice(0)}"


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def dvc(args: list[str], cwd: Path) -> tuple[float, str]:
    """Runs `dvc <args>` in `cwd` with this interpreter's environment first on PATH (the stages say `python`)."""
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    t0 = time.perf_counter()
    proc = subprocess.run([os.path.join(bindir, "dvc"), *args], cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"dvc {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return wall, proc.stdout + proc.stderr


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def stage_seconds(repo: Path, since: int) -> list[str]:
    """Each stage's own time (its run log, imports excluded) for the records written after line `since`."""
    lines = (repo / "runs" / "history.jsonl").read_text().splitlines()[since:]
    out = []
    for line in lines:
        r = json.loads(line)
        what = r["stage"] + (f"@{r['argv'][0]}" if r["stage"] == "heads" else "")
        out.append(f"{what} {r['seconds']:.1f} s")
    return out


def history_len(repo: Path) -> int:
    path = repo / "runs" / "history.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def set_dropout(repo: Path, value: float) -> None:
    params = repo / "params.yaml"
    text = params.read_text()
    # the `dropout:` key of the `mlp:` section (the only dropout under heads)
    new, n = re.subn(r"(\n  mlp:\n(?:    .*\n)*?    dropout: )[0-9.]+", rf"\g<1>{value}", text)
    if n != 1:
        raise SystemExit("could not find heads.mlp.dropout in params.yaml")
    params.write_text(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="head swaps to time (dropout values in turn)")
    ap.add_argument("--dropouts", type=float, nargs="+", default=list(DROPOUTS),
                    help="heads.mlp.dropout values to swap to, in turn (default: %(default)s)")
    ap.add_argument("--keep", type=Path, help="make the clone here and keep it (default: a temporary folder)")
    ap.add_argument("--reuse", type=Path, help="a clone kept by --keep that has run its full repro: time swaps only")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    print(f"code: {subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO, capture_output=True, text=True).stdout.strip()} "
          f"({subprocess.run(['git', 'rev-parse', '--abbrev-ref', 'HEAD'], cwd=REPO, capture_output=True, text=True).stdout.strip()})")
    tmp = None
    if args.reuse:
        repo, full = args.reuse, None
    else:
        if args.keep:
            repo = args.keep
        else:
            tmp = tempfile.mkdtemp(prefix="head_swap_")
            repo = Path(tmp) / "repo"
        subprocess.run(["git", "clone", "--quiet", str(REPO), str(repo)], check=True)
        before, since = load(), history_len(repo)
        full, out = dvc(["repro"], repo)
        print(f"full dvc repro: {full:.1f} s wall (load average before {before}, after {load()})")
        print(f"  stages: {', '.join(stage_seconds(repo, since))}")
    swaps = []
    try:
        for value in args.dropouts[:args.repeats]:
            set_dropout(repo, value)
            before, since = load(), history_len(repo)
            # --no-run-cache: a value tried before (an earlier --reuse run) would be restored, not refitted
            wall, out = dvc(["repro", "--no-run-cache", "select"], repo)
            swaps.append(wall)
            print(f"dvc repro --no-run-cache select after heads.mlp.dropout={value}: {wall:.1f} s wall (ran {', '.join(stages_run(out))}; "
                  f"load average before {before}, after {load()})")
            print(f"  stages: {', '.join(stage_seconds(repo, since))}")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    best, median = min(swaps), sorted(swaps)[len(swaps) // 2]
    line = f"head swap: best {best:.1f} s, median {median:.1f} s (target <= 10 s)"
    if full:
        line += f"; full repro {full:.1f} s; ratio {100 * median / full:.1f} % of the full repro (target <= 5 %)"
    print(line)


if __name__ == "__main__":
    main()
