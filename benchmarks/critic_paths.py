"""Which calls of the critic ensemble should run on oneDNN: every call, none, or the large ones only.

Run from the repository root:
    python benchmarks/critic_paths.py [--quick] [--rounds 5] [--updates 40]

On CPU in float32 the plain ReLU critics can run each layer as one oneDNN matmul per member
(`components/onednn_ensemble.py`) or as one batched matmul for all members (`torch.baddbmm`).
An update calls the critics on B(3N+1) rows (the CQL call at s, 7936 rows at B 256, N 10) and on
B rows (the target at s', the actor loss at s; all calls of a SAC-mode update). For the update at
each of the pipeline's network sizes (`cql_update.PIPELINE_SIZES`: 64x64 for Pendulum, 128x128 for
LunarLander and Hopper, 256x256), CQL and SAC mode (`cql_weight=0`), this times three routings of
the same update, in alternating rounds in one process on the same batches:

- `onednn`: oneDNN on every call (`onednn_min_rows = 0`);
- `batched`: `torch.baddbmm` on every call (`use_onednn = False`);
- `default`: oneDNN on calls of at least `EnsembleMLP.onednn_min_rows` rows, batched otherwise.

Each update is the same computation up to float rounding. One thread, timed in CPU seconds of that
thread (`time.thread_time`), which other processes on a shared machine barely move (sweep workers
run one thread each too); the routings alternate in rounds and each keeps its fastest round. It
prints CPU milliseconds per update and the default's speed over each of the other two; the last
line, for scripts, is
    default_over_best_single_path: X   (the smallest, over sizes and modes, of the default's speed
                                        over the faster of `onednn` and `batched`)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from cql_update import CQL_WEIGHT, PIPELINE_SIZES, TAU, cpu_model, load_note, make_ours, synthetic_buffer, usable_cores

from cqlsac.components.allocator import keep_freed_memory
from cqlsac.components.networks import EnsembleMLP
from cqlsac.components.update import update_step

ROUTINGS = ("onednn", "batched", "default")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--num-actions", type=int, default=10, help="N, actions per CQL set")
    p.add_argument("--rounds", type=int, default=5, help="rounds of each routing, alternating")
    p.add_argument("--updates", type=int, default=40, help="CQL updates per round (SAC mode: 4x as many)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--buffer-size", type=int, default=100_000)
    p.add_argument("--quick", action="store_true", help="3 rounds of 10 updates")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.updates, args.warmup = 3, 10, 2
    return args


def fastest_cpu_ms(fns: dict[str, Callable[[int], None]], rounds: int, updates: int, warmup: int) -> dict[str, float]:
    """CPU milliseconds per call of each fn(k), its fastest of `rounds` rounds in rotating order."""
    for fn in fns.values():
        for k in range(warmup):
            fn(k)
    best = {name: float("inf") for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # each fn leads a round in turn
            fn = fns[name]
            t0 = time.thread_time()
            for k in range(updates):
                fn(k)
            best[name] = min(best[name], (time.thread_time() - t0) / updates * 1e3)
    return best


def routed(loss, routing: str):
    """`loss` with its critic and target critic set to one routing (instance attributes)."""
    for ensemble in (loss.critic, loss.target_critic):
        if routing == "onednn":
            ensemble.onednn_min_rows = 0
        elif routing == "batched":
            ensemble.use_onednn = False
    return loss


def measure(args, hidden, obs_dim, act_dim, cql_weight) -> dict[str, float]:
    """CPU ms per update of the three routings of one size and mode."""
    size = argparse.Namespace(hidden=hidden, obs_dim=obs_dim, act_dim=act_dim, batch=args.batch,
                              num_actions=args.num_actions, buffer_size=args.buffer_size)
    rb = synthetic_buffer(size)
    pool = [rb.sample() for _ in range(16)]
    fns = {}
    for routing in ROUTINGS:
        loss, optimizer = make_ours(size, torch.device("cpu"), cql_weight=cql_weight)
        routed(loss, routing)
        fns[routing] = lambda k, loss=loss, optimizer=optimizer: update_step(loss, optimizer, pool[k % len(pool)], TAU)
    updates = args.updates if cql_weight else 4 * args.updates
    return fastest_cpu_ms(fns, args.rounds, updates, args.warmup)


def main(argv=None) -> None:
    args = parse_args(argv)
    cores = usable_cores()
    torch.set_num_threads(1)
    keep_freed_memory()
    print(f"torch {torch.__version__} | 1 thread, {cores} cores | CPU {cpu_model()}")
    print(f"batch {args.batch}, N {args.num_actions}, plain critics, fastest of {args.rounds} rounds of {args.updates} "
          f"CQL / {4 * args.updates} SAC-mode updates | default: oneDNN on calls of at least "
          f"{EnsembleMLP.onednn_min_rows} rows | {load_note(cores)}")
    print("\n| size | mode | onednn ms | batched ms | default ms | default speed / onednn | default speed / batched |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    t0, worst = time.perf_counter(), float("inf")
    for hidden, obs_dim, act_dim, what in PIPELINE_SIZES:
        for mode, cql_weight in (("CQL", CQL_WEIGHT), ("SAC", 0.0)):
            r = measure(args, hidden, obs_dim, act_dim, cql_weight)
            worst = min(worst, min(r["onednn"], r["batched"]) / r["default"])
            print(f"| {hidden}x{hidden} ({what}) | {mode} | {r['onednn']:.2f} | {r['batched']:.2f} | "
                  f"{r['default']:.2f} | {r['onednn'] / r['default']:.2f} | {r['batched'] / r['default']:.2f} |",
                  flush=True)
    print(f"\n(total run time {time.perf_counter() - t0:.0f} s; {load_note(cores)})")
    print(f"default_over_best_single_path: {worst:.3f}")


if __name__ == "__main__":
    main()
