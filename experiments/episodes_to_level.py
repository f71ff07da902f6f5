"""Training episodes until the mean return of the last W episodes first reaches a level, for any
online stage in the stage cache (pretraining, fine-tuning, SAC from scratch).

The sweep report gives this figure for fine-tuning and SAC from scratch; this script reads it from
stages the report does not see, such as the pretraining that recorded a dataset used by name
(its SAC run has the same settings as SAC from scratch, with another collector seed).

    python experiments/episodes_to_level.py runs/cache/pretrain-0cbc952fcb3e [STAGE_DIR ...] \
        [--level 200] [--window 20]

Prints one markdown row per stage: episodes, frames, episodes to the level (never: not within
its episodes) and the highest mean of W consecutive episodes with the episode it ended at.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cqlsac.pipeline.report import episodes_to_level, window_means


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("stages", nargs="+", type=Path, help="stage directories holding outputs.json")
    p.add_argument("--level", type=float, default=200.0, help="return level (the seed's LunarLander: 200)")
    p.add_argument("--window", type=int, default=20, help="episodes in the moving mean")
    args = p.parse_args(argv)
    print(f"| stage | episodes | frames | episodes until the mean of {args.window} reaches {args.level:g} "
          f"| highest mean of {args.window} (at episode) |")
    print("| --- | --- | --- | --- | --- |")
    for stage in args.stages:
        try:
            episodes = json.loads((stage / "outputs.json").read_text())["episodes"]
        except (OSError, KeyError, ValueError) as err:
            print(f"error: {stage}: no training episodes in its outputs.json ({err})", file=sys.stderr)
            return 2
        reached = episodes_to_level(episodes, args.level, args.window)
        best = max(window_means(episodes, args.window), default=None)
        best_text = "-" if best is None else f"{best[0]:.1f} ({best[1]})"
        print(f"| {stage.name} | {len(episodes)} | {episodes[-1][0] if episodes else 0} "
              f"| {'never' if reached is None else reached} | {best_text} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
