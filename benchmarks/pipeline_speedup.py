"""The default pipeline's wall time now against an earlier commit's, measured in one run.

Checks the earlier commit out into a temporary git worktree, runs `cqlsac run` with that code
and then with the installed code (each in a fresh process, fresh stage cache, fresh Minari store),
and prints both wall times, their ratio and the seed's headline numbers side by side: where the
computation did not change they must match.

    python benchmarks/pipeline_speedup.py --baseline 6d48754 [--variant "compile=true" ...]

Each `--variant` is one more run of the current code with those overrides (the baseline gets none:
its code may not know the keys). Ends with one line per variant that scripts read:
`pipeline_wall_ratio[VARIANT]: X` (current wall / baseline wall; lower is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("components", "datasets", "pipeline", "configs")
NUMBERS = ("dataset_mean_return", "offline_eval_return", "final_eval_return", "sac_final_return")
RUN = "import sys; from cqlsac.pipeline.cli import main; sys.exit(main(sys.argv[1:]))"


def code_at(commit: str, root: Path) -> Path:
    """A folder that, put on PYTHONPATH, makes `import cqlsac...` load `commit`'s code."""
    tree = root / "tree"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-f", str(tree), commit],
                   check=True, capture_output=True)
    package = root / "pkg" / "cqlsac"
    package.mkdir(parents=True)
    for name in PACKAGES:
        if (tree / name).is_dir():
            (package / name).symlink_to(tree / name)
    return root / "pkg"


def timed_run(label: str, root: Path, overrides: list[str], pythonpath: Path | None) -> tuple[float, dict]:
    """Wall seconds of one default pipeline run in fresh folders, and its summary."""
    work = root / label
    env = {**os.environ, "MINARI_DATASETS_PATH": str(work / "minari"), "CQLSAC_CACHE": str(work / "transitions")}
    env.pop("PYTHONPATH", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    args = ["run", f"cache_dir={work / 'cache'}", f"output_dir={work / 'runs'}", *overrides]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", RUN, *args], cwd=root, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{label} run failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    summary = json.loads(next((work / "runs").glob("*/summary.json")).read_text())
    return seconds, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="the commit to compare against")
    parser.add_argument("--variant", action="append", default=[], help="overrides for one more current run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        try:
            baseline_path = code_at(args.baseline, root)
            print(f"{platform.machine()} | {os.cpu_count()} cores | load {os.getloadavg()[0]:.2f} "
                  f"| baseline {args.baseline}", flush=True)
            results = {"baseline": timed_run("baseline", root, [], baseline_path)}
            for variant in ["", *args.variant]:
                results[variant or "default"] = timed_run(f"current{len(results)}", root, shlex.split(variant), None)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(root / "tree")],
                           capture_output=True)
    print(f"load after {os.getloadavg()[0]:.2f}")
    print("| code | wall s | " + " | ".join(NUMBERS) + " |")
    print("| --- | --- |" + " --- |" * len(NUMBERS))
    for label, (seconds, summary) in results.items():
        print(f"| {label} | {seconds:.1f} | " + " | ".join(f"{summary.get(k)}" for k in NUMBERS) + " |")
    base_seconds = results["baseline"][0]
    for label, (seconds, _) in results.items():
        if label != "baseline":
            print(f"pipeline_wall_ratio[{label}]: {seconds / base_seconds:.3f}")


if __name__ == "__main__":
    main()
