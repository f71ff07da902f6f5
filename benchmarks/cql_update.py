"""Speed of one CQL-SAC update: this project's `update_step` against `torchrl.objectives.CQLLoss`.

Run from the repository root:
    python benchmarks/cql_update.py [--quick] [--compile] [--profile 20] [--threads 1] [--omp-passive]
    python benchmarks/cql_update.py --device cuda --compile --cudagraph [--batch 1024]
    python benchmarks/cql_update.py --pipeline-sizes [--quick] [--threads 1]

Everything runs in one process on the same synthetic data (a `ReplayBuffer` over a
`LazyTensorStorage` of ~100k transitions in TorchRL layout), after
`components.allocator.keep_freed_memory()` (opt out: `CQLSAC_MALLOC_TUNING=0`). Our update,
torchrl's and the GEMM references are timed in interleaved rounds, so that a slow spell of a shared machine hits all of
them alike. torchrl's `CQLLoss` is built as its sota-implementations/cql example builds it
(TanhNormal `ProbabilisticActor`, `ValueOperator` MLP on cat(obs, action), twin critics by vmap)
and configured like ours: N random actions, MSE TD loss, soft backup, CQL weight 5, no Lagrange,
gamma 0.99, `SoftUpdate(tau=0.005)`, Adam on actor / critics / alpha, one backward of the sum.

Caveat for shared machines: with torch's default OpenMP spinning, every parallel region waits
for a thread that another process may hold, and a 2-thread update can slow down several-fold
(it hits the implementation with more kernels harder, so it also moves the ratio). The header
prints the load average; compare runs with `--threads 1` or `--omp-passive` when it is high.

The last two lines are for scripts:
    speedup_vs_torchrl_eager: X      (our updates/s / torchrl CQLLoss eager updates/s)
    fraction_of_sgemm_limit: Y       (FLOPs per update * our updates/s / faster measured sgemm FLOP/s)

Two float32 GEMM references of the same shape are timed: `torch.matmul` (MKL on x86 CPUs) and,
on CPU where torch has it, oneDNN's fp32 matmul (`torch.ops.mkldnn._linear_pointwise`, which our
critic ensemble uses). On the AMD EPYC development machine MKL runs AVX2 code and oneDNN AVX-512,
about 2x apart. The limit and the fraction use the faster of the two, so that a faster GEMM
library in our update cannot make the fraction look better than it is; the table also shows the
fraction against `torch.matmul` alone.

FLOPs per update (counted from the shapes, matmuls only; element-wise work is ignored)
--------------------------------------------------------------------------------------
A dense layer `in -> out` applied to R rows costs 2 * R * in * out FLOPs forward (one
multiply-add = 2 FLOPs). Its backward costs the same again for each gradient it must produce:
the input gradient (dX = dY W^T) and the weight gradient (dW = X^T dY). Hence per layer:
    x3  forward + backward, gradients to weights and inputs;
    x2  forward + backward, only one of the two gradients (input-only: detached weights;
        weight-only: the first layer, whose input is data);
    x1  no-grad call (target critic, sampling under no_grad).
Notation: B batch, o obs dim, a act dim, N actions per CQL set, E critics (2),
actor sizes o -> h1 -> ... -> 2a, critic sizes (o + a) -> h1 -> ... -> 1.

  actor, a call at s (B rows, gradient to the weights) and a no-grad call at s' (B rows):
      2 * B * [2 * o*h1 + 3 * (h1*h2 + ... + h_last*2a)] + 2 * B * [o*h1 + h1*h2 + ... + h_last*2a]
      (first layer x2: its input is data)
  fused critic call, E members, at s for the data action and 3N sampled actions, gradient to the
  weights only (all actions are detached); the observation part of the first layer is counted
  once per state (B rows), the action part for B(3N+1) rows:
      2 * E * [2 * B*o*h1 + 2 * B(3N+1)*a*h1 + 3 * B(3N+1) * (h1*h2 + ... + h_last*1)]
  actor-loss critic call, B rows, detached weights, gradient to the action only:
      2 * E * [1 * B*o*h1 + 2 * B*a*h1 + 2 * B * (h1*h2 + ... + h_last*1)]
  target critic call, B rows, one next action (no max-Q backup), no grad:
      2 * E * [B*(o+a)*h1 + B * (h1*h2 + ... + h_last*1)]
In SAC mode (cql_weight = 0) the fused call shrinks to the data action, K = 1 instead of 3N+1.
The formula counts the work the update needs. `EnsembleMLP` does slightly more (~0.2 GFLOP): its
first layer multiplies the whole (s, a) row of every action, because one K = o + a matmul is faster
here than a state part, an action part and a broadcast add; that extra is not counted, so the
fraction below is, if anything, understated.
At the defaults (B 256, h 256, o 11, a 3, N 10, E 2) this is 6.67 GFLOP per CQL update,
dominated by the 256x256 critic layer on B(3N+1) = 7,936 rows per member, which is why the
sgemm references are (7936 x 256) @ (256 x 256).

`--pipeline-sizes`: the network sizes the pipeline trains
---------------------------------------------------------
One run over four sizes (hidden width of both layers, obs dim, act dim): 64, 3, 1 (Pendulum, the
default pipeline); 128, 8, 2 (LunarLander continuous); 128, 11, 3 (Hopper); 256, 11, 3 (the
reference size above). For each size, in interleaved rounds on the same batches:
    (a) our update eager, plain critics (as in the single-size mode);
    (b) our update eager, layer-normalised critics (`NetworkConfig.critic_layer_norm`, the default
        pipeline's critics);
    (c) our update with `CQLSACLoss(..., compile=True)` and layer-normalised critics, which is what
        the pipeline's `compile: true` runs; its first call compiles forward and backward and is
        reported apart, after `torch._dynamo.reset()` so that no size reuses another's graphs (a warm
        on-disk inductor cache shortens it);
    (d) torchrl's CQLLoss eager, built and configured as above;
    (e) our update in SAC mode (cql_weight = 0), eager, plain critics (SAC from scratch has them);
    (f) the same compiled (`compile=True`), as SAC from scratch, pretraining and fine-tuning without
        the CQL term run with the pipeline's `compile: true`;
    and the two sgemm references at (B(3N+1) x h) @ (h x h) of that size.
The arithmetic limit is FLOPs per update (the formula above; layer norm is element-wise and adds
none) / the faster sgemm. One markdown table per size; the last two lines are for the 64 size:
speedup (a)/(d), and the fraction of the sgemm limit of the fastest of (a), (b), (c), which its
table names. The single-size flags --hidden, --obs-dim, --act-dim, --compile, --cudagraph and
--profile do not apply.
"""

from __future__ import annotations

import os
import sys

if "--omp-passive" in sys.argv[1:]:
    # Read by the OpenMP runtime when torch loads it, so it must be set before `import torch`.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402
from tensordict import TensorDict  # noqa: E402
from tensordict.nn import NormalParamExtractor, TensorDictModule  # noqa: E402
from torchrl.data import Bounded, LazyTensorStorage, ReplayBuffer, Unbounded  # noqa: E402
from torchrl.modules import MLP, ProbabilisticActor, TanhNormal, ValueOperator  # noqa: E402
from torchrl.objectives import CQLLoss, SoftUpdate  # noqa: E402

from cqlsac.components import onednn_ensemble  # noqa: E402
from cqlsac.components.allocator import ENV_SWITCH, keep_freed_memory  # noqa: E402
from cqlsac.components.config import LossConfig, NetworkConfig, OptimConfig  # noqa: E402
from cqlsac.components.cql_loss import CQLSACLoss  # noqa: E402
from cqlsac.components.networks import EnsembleMLP, make_actor, make_critics  # noqa: E402
from cqlsac.components.update import cuda_graph_update, make_optimizer, polyak_update, update_step  # noqa: E402

GAMMA, TAU, CQL_WEIGHT = 0.99, 0.005, 5.0
# --pipeline-sizes: (hidden width, obs dim, act dim, what trains at that size)
PIPELINE_SIZES = [
    (64, 3, 1, "Pendulum, the default pipeline"),
    (128, 8, 2, "LunarLander continuous"),
    (128, 11, 3, "Hopper"),
    (256, 11, 3, "the reference size"),
]


# --- set-up -----------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256, help="width of the two hidden layers of actor and critics")
    p.add_argument("--obs-dim", type=int, default=11)
    p.add_argument("--act-dim", type=int, default=3)
    p.add_argument("--num-actions", type=int, default=10, help="N, actions per CQL set (torchrl: num_random)")
    p.add_argument("--seconds", type=float, default=10.0, help="time per updates/s measurement")
    p.add_argument("--warmup", type=int, default=5, help="untimed updates before each measurement")
    p.add_argument("--buffer-size", type=int, default=100_000)
    p.add_argument("--compile", action="store_true", help="also measure torch.compile of our update_step")
    p.add_argument("--cudagraph", action="store_true",
                   help="also measure our update recorded as a CUDA graph (components.update.cuda_graph_update); "
                        "needs --device cuda")
    p.add_argument("--profile", type=int, default=0, metavar="K",
                   help="profile K of our updates with torch.profiler and print the top ops")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = the cores this process may use")
    p.add_argument("--omp-passive", action="store_true",
                   help="set OMP_WAIT_POLICY=PASSIVE (unless set): OpenMP threads sleep instead of spinning "
                        "at barriers, which keeps multi-threaded numbers sane when other processes share the cores")
    p.add_argument("--quick", action="store_true", help="~30 s run: short measurements, one collector batch")
    p.add_argument("--pipeline-sizes", action="store_true",
                   help="instead of one size, the four network sizes of the pipeline's envs, each with our update "
                        "eager (plain and layer-normalised critics), compiled, torchrl's, SAC mode and the sgemm limit "
                        "(see the docstring); always compiles, so allow a few minutes more")
    args = p.parse_args(argv)
    if args.cudagraph and args.device != "cuda":
        p.error("--cudagraph needs --device cuda (CUDA graphs record CUDA kernels)")
    if args.pipeline_sizes and (args.cudagraph or args.profile):
        p.error("--pipeline-sizes measures neither --cudagraph nor --profile; run those in the single-size mode")
    if args.quick:
        args.seconds, args.warmup = min(args.seconds, 2.0), min(args.warmup, 2)
    return args


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_sync(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def specs(args):
    obs_spec = Unbounded(shape=(args.obs_dim,))
    act_spec = Bounded(low=-torch.ones(args.act_dim), high=torch.ones(args.act_dim), shape=(args.act_dim,))
    return obs_spec, act_spec


def synthetic_buffer(args) -> ReplayBuffer:
    """~100k random transitions in TorchRL layout, actions in [-1, 1], ~1% terminal steps."""
    n, g = args.buffer_size, torch.Generator().manual_seed(0)
    terminated = torch.rand(n, 1, generator=g) < 0.01
    truncated = (torch.rand(n, 1, generator=g) < 0.005) & ~terminated
    data = TensorDict({
        "observation": torch.randn(n, args.obs_dim, generator=g),
        "action": torch.rand(n, args.act_dim, generator=g) * 2 - 1,
        "next": {
            "observation": torch.randn(n, args.obs_dim, generator=g),
            "reward": torch.randn(n, 1, generator=g),
            "done": terminated | truncated,
            "terminated": terminated,
            "truncated": truncated,
        },
    }, batch_size=[n])
    rb = ReplayBuffer(storage=LazyTensorStorage(n), batch_size=args.batch)
    rb.extend(data)
    return rb


def make_ours(args, device, cql_weight=CQL_WEIGHT, layer_norm=False, compile=False):
    obs_spec, act_spec = specs(args)
    net = NetworkConfig(actor_hidden=(args.hidden,) * 2, critic_hidden=(args.hidden,) * 2, critic_layer_norm=layer_norm)
    loss = CQLSACLoss(make_actor(obs_spec, act_spec, net), make_critics(obs_spec, act_spec, net),
                      LossConfig(gamma=GAMMA, cql_weight=cql_weight, num_actions=args.num_actions),
                      compile=compile).to(device)
    return loss, make_optimizer(loss, OptimConfig(tau=TAU))


def make_torchrl(args, device):
    """torchrl's CQLLoss as its sota-implementations/cql example builds it, with our sizes and options."""
    obs_spec, act_spec = specs(args)
    actor_net = torch.nn.Sequential(
        MLP(in_features=args.obs_dim, out_features=2 * args.act_dim, num_cells=[args.hidden] * 2,
            activation_class=torch.nn.ReLU),
        NormalParamExtractor(scale_mapping="biased_softplus_1.0", scale_lb=1e-4),
    )
    actor = ProbabilisticActor(
        TensorDictModule(actor_net, in_keys=["observation"], out_keys=["loc", "scale"]),
        in_keys=["loc", "scale"], spec=act_spec, distribution_class=TanhNormal,
        distribution_kwargs={"low": act_spec.space.low.to(device), "high": act_spec.space.high.to(device),
                             "tanh_loc": False},
    )
    q_net = MLP(in_features=args.obs_dim + args.act_dim, out_features=1, num_cells=[args.hidden] * 2,
                activation_class=torch.nn.ReLU)
    qvalue = ValueOperator(q_net, in_keys=["observation", "action"], out_keys=["state_action_value"])
    # Twin critics (CQLLoss always builds 2), MSE TD loss, soft backup, CQL weight w, N random actions.
    loss = CQLLoss(actor.to(device), qvalue.to(device), loss_function="l2", temperature=1.0,
                   min_q_weight=CQL_WEIGHT, max_q_backup=False, deterministic_backup=False,
                   num_random=args.num_actions, with_lagrange=False)
    loss.make_value_estimator(gamma=GAMMA, device=device)
    updater = SoftUpdate(loss, tau=TAU)
    optimizer = torch.optim.Adam([
        {"params": list(loss.actor_network_params.flatten_keys().values()), "lr": 1e-4},
        {"params": list(loss.qvalue_network_params.flatten_keys().values()), "lr": 3e-4},
        {"params": [loss.log_alpha], "lr": 3e-4},
    ])
    return loss, optimizer, updater


def torchrl_update(loss, optimizer, updater, batch):
    """The update of torchrl's cql_offline.py after the BC phase: sum, backward, Adam, SoftUpdate."""
    vals = loss(batch)
    total = vals["loss_actor"] + vals["loss_qvalue"] + vals["loss_cql"] + vals["loss_alpha"]
    total.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    updater.step()
    return vals.detach()


# --- measurements -----------------------------------------------------------------------------
@dataclass
class Rate:
    iterations: int = 0
    seconds: float = 0.0

    @property
    def per_s(self) -> float:
        return self.iterations / self.seconds if self.seconds else float("nan")


def run_for(fn, seconds, sync, rate: Rate, start=0) -> int:
    """Call fn(0), fn(1), ... (k-th update) for about `seconds`; adds to rate; returns the next k."""
    i = start
    sync()
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        fn(i)
        i += 1
        sync()
        now = time.perf_counter()
        if now >= deadline:
            break
    rate.iterations += i - start
    rate.seconds += now - t0
    return i


def interleaved_rates(fns: dict, seconds, warmup, sync, rounds=5, shares=None) -> dict[str, Rate]:
    """Calls/s of each fn(k), measured in alternating rounds so that a slow spell of a shared
    machine hits all of them alike; fn gets about seconds * shares[fn] / sum(shares) in all."""
    shares = {name: (shares or {}).get(name, 1.0) for name in fns}
    total_share = sum(shares.values())
    for fn in fns.values():
        for k in range(warmup):
            fn(k)
    rates = {name: Rate() for name in fns}
    index = {name: 0 for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            budget = seconds * shares[name] / total_share / rounds
            index[name] = run_for(fn, budget, sync, rates[name], index[name])
    return rates


def time_split(loss, optimizer, rb, device, seconds, warmup, sync) -> dict[str, float]:
    """Mean ms per update of: replay sampling, forward (losses), backward, optimizer step + Polyak.

    The same operations as `update_step`, cut at the phase boundaries with a synchronised timer.
    """
    phases = ["sample", "forward", "backward", "step+polyak"]
    totals = dict.fromkeys(phases, 0.0)
    n, t_start = 0, time.perf_counter()
    while n < warmup or time.perf_counter() - t_start < seconds:
        sync()
        t0 = time.perf_counter()
        batch = rb.sample().to(device)
        sync()
        t1 = time.perf_counter()
        losses = loss(batch)
        total = sum(value for key, value in losses.items() if key.startswith("loss_"))
        sync()
        t2 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        sync()
        t3 = time.perf_counter()
        optimizer.step()
        polyak_update(loss.target_critic, loss.critic, TAU)
        loss.update_count += 1
        sync()
        t4 = time.perf_counter()
        n += 1
        if n > warmup:
            for phase, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                totals[phase] += dt
    measured = n - warmup
    return {phase: 1e3 * t / measured for phase, t in totals.items()}


def sampling_rate(rb, seconds) -> float:
    """Batches per second drawn from the replay buffer (sampling + gathering, no transfer)."""
    for _ in range(10):
        rb.sample()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        rb.sample()
        n += 1
    return n / (time.perf_counter() - t0)


def matmul_fn(shape_a, shape_b, device):
    """(fn(k) doing one float32 torch.matmul of these shapes, its FLOPs = 2*m*k*n per product)."""
    a = torch.randn(*shape_a, device=device)
    b = torch.randn(*shape_b, device=device)
    out = torch.matmul(a, b)
    return (lambda k: torch.matmul(a, b, out=out)), 2 * out.numel() * a.shape[-1]


def onednn_matmul_fn(shape_a, shape_b, device):
    """Like `matmul_fn` with oneDNN's fp32 matmul (CPU builds with oneDNN); None where unavailable."""
    linear = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if device.type != "cpu" or linear is None or not torch.backends.mkldnn.is_available():
        return None, 0
    a = torch.randn(*shape_a)
    b_t = torch.randn(*shape_b).t()  # linear computes a @ b_t.T
    return (lambda k: linear(a, b_t, None, "none", [], "")), 2 * shape_a[0] * shape_a[1] * shape_b[1]


def sgemm_gflops(shape_a, shape_b, device, seconds, sync) -> float:
    """GFLOP/s of torch.matmul for float32 operands of these shapes."""
    fn, flops = matmul_fn(shape_a, shape_b, device)
    rate = interleaved_rates({"mm": fn}, seconds, 5, sync, rounds=1)["mm"]
    return flops * rate.per_s / 1e9


def layer_sizes(first_in, hidden, last_out):
    sizes = [first_in, *hidden, last_out]
    return list(zip(sizes[:-1], sizes[1:]))


def flops_per_update(batch, obs, act, hidden, num_actions, num_critics=2, cql=True) -> dict[str, float]:
    """FLOPs of the matmuls of one update of CQLSACLoss + backward (formula in the module docstring)."""
    h = list(hidden)
    actor_rest = sum(i * o for i, o in layer_sizes(obs, h, 2 * act)[1:])
    critic_rest = sum(i * o for i, o in layer_sizes(obs + act, h, 1)[1:])
    k = 3 * num_actions + 1 if cql else 1
    rows = batch * k
    e = num_critics
    return {
        "actor (B rows with grad, B without)": 2 * batch * (3 * obs * h[0] + 4 * actor_rest),
        f"fused critic ({k} actions/state)": 2 * e * (2 * batch * obs * h[0] + 2 * rows * act * h[0]
                                                      + 3 * rows * critic_rest),
        "actor-loss critic (grad to action)": 2 * e * (batch * obs * h[0] + 2 * batch * act * h[0]
                                                       + 2 * batch * critic_rest),
        "target critic (no grad)": 2 * e * (batch * (obs + act) * h[0] + batch * critic_rest),
    }


def collector_fps(policy, frames_per_batch, batches) -> float:
    """Frames/s of a torchrl Collector over Pendulum-v1 (first batch, with env start-up, untimed)."""
    from torchrl.collectors import Collector

    from cqlsac.components.envs import make_env

    collector = Collector(lambda: make_env("Pendulum-v1", seed=0), policy, frames_per_batch=frames_per_batch,
                          total_frames=frames_per_batch * (batches + 1), auto_register_policy_transforms=False)
    frames, t0 = 0, None
    for i, data in enumerate(collector):
        if i == 0:
            t0 = time.perf_counter()
            continue
        frames += data.numel()
    elapsed = time.perf_counter() - t0
    collector.shutdown()
    return frames / elapsed


def pendulum_actor(hidden):
    from cqlsac.components.envs import make_env

    env = make_env("Pendulum-v1")
    net = NetworkConfig(actor_hidden=(hidden,) * 2, critic_hidden=(hidden,) * 2)
    actor = make_actor(env.observation_spec["observation"], env.action_spec, net)
    env.close()
    return actor


def profile_ours(loss, optimizer, pool, updates, warmup, rows=20):
    from torch.profiler import ProfilerActivity, profile

    for k in range(warmup):
        update_step(loss, optimizer, pool[k % len(pool)], TAU)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for k in range(updates):
            update_step(loss, optimizer, pool[k % len(pool)], TAU)
    print(f"\n# torch.profiler, {updates} updates of our update_step, top ops by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    print("# the same, by input shape")
    print(prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=28, max_shapes_column_width=64))


# --- the run -----------------------------------------------------------------------------
def measure_updates(args, device, sync, rb) -> dict:
    """Items 1-3 and the sgemm reference, interleaved; then SAC mode and the time split."""
    pool = [rb.sample().to(device) for _ in range(32)]  # the same batches for every update measurement
    torchrl_pool = [b.clone() for b in pool]  # CQLLoss writes into its input; keep ours clean
    ours, ours_opt = make_ours(args, device)
    trl, trl_opt, trl_updater = make_torchrl(args, device)
    fns = {
        "ours": lambda k: update_step(ours, ours_opt, pool[k % len(pool)], TAU),
        "torchrl": lambda k: torchrl_update(trl, trl_opt, trl_updater, torchrl_pool[k % len(pool)]),
    }
    res = {"compile_seconds": None}
    if args.compile:
        fns["compiled"], res["compile_seconds"] = compiled_update(args, device, pool, sync)
    if args.cudagraph:
        graph_loss = make_ours(args, device)[0]
        graphed = cuda_graph_update(graph_loss, make_optimizer(graph_loss, OptimConfig(tau=TAU), capturable=True), TAU)
        fns["cudagraph"] = lambda k: graphed(pool[k % len(pool)])
    res.update(rates_with_sgemm(fns, args, device, sync))
    del fns  # frees torchrl's loss and its copies of the batches before the next measurements

    sac, sac_opt = make_ours(args, device, cql_weight=0.0)
    res["sac"] = interleaved_rates({"sac": lambda k: update_step(sac, sac_opt, pool[k % len(pool)], TAU)},
                                   args.seconds, args.warmup, sync, rounds=1)["sac"].per_s
    res["split"] = time_split(ours, ours_opt, rb, device, args.seconds, args.warmup, sync)
    res["profile_target"] = (ours, ours_opt, pool)
    return res


def rates_with_sgemm(fns: dict, args, device, sync) -> dict:
    """Calls/s of each update fn, timed in the same interleaved rounds as the two sgemm references
    of the critic's hidden layer (so that the fraction of the limit compares like with like); adds
    "sgemm", "sgemm_onednn" (None where unavailable) and "sgemm_best" in GFLOP/s."""
    rows = args.batch * (3 * args.num_actions + 1)
    shape_a, shape_b = (rows, args.hidden), (args.hidden, args.hidden)
    fns = dict(fns)
    fns["sgemm"], mm_flops = matmul_fn(shape_a, shape_b, device)
    onednn_fn, onednn_flops = onednn_matmul_fn(shape_a, shape_b, device)
    if onednn_fn is not None:
        fns["sgemm_onednn"] = onednn_fn
    shares = {"sgemm": 0.25, "sgemm_onednn": 0.25}
    total = sum(shares.get(name, 1.0) for name in fns) * args.seconds
    rates = interleaved_rates(fns, total, args.warmup, sync, shares=shares)
    res = {name: rate.per_s for name, rate in rates.items()}
    res["sgemm"] = mm_flops * rates["sgemm"].per_s / 1e9  # GFLOP/s
    res["sgemm_onednn"] = onednn_flops * rates["sgemm_onednn"].per_s / 1e9 if onednn_fn is not None else None
    res["sgemm_best"] = max(res["sgemm"], res["sgemm_onednn"] or 0.0)
    return res


def measure_rest(args, device, sync, rb) -> dict:
    """Replay sampling, the other matmul shapes of the update, collector frames/s."""
    rows = args.batch * (3 * args.num_actions + 1)
    gemm_s = min(args.seconds / 4, 2.0)
    n_batches = 1 if args.quick else 3
    return {
        "batches_per_s": sampling_rate(rb, min(args.seconds, 3.0)),
        "gemm": {
            f"bmm 2x({rows}x{args.hidden})@({args.hidden}x{args.hidden})":
                sgemm_gflops((2, rows, args.hidden), (2, args.hidden, args.hidden), device, gemm_s, sync),
            f"mm ({args.hidden}x{rows})@({rows}x{args.hidden}) (weight grad)":
                sgemm_gflops((args.hidden, rows), (rows, args.hidden), device, gemm_s, sync),
        },
        "fps_random": collector_fps(None, 1000, n_batches),
        "fps_actor": collector_fps(pendulum_actor(args.hidden), 1000, n_batches),
    }


def measure_size(args, device, sync, hidden, obs_dim, act_dim) -> dict:
    """(a)-(e) of `--pipeline-sizes` at one size, interleaved with its sgemm references; updates/s,
    GFLOP/s and the compile seconds of (c) and (f)."""
    size = argparse.Namespace(**{**vars(args), "hidden": hidden, "obs_dim": obs_dim, "act_dim": act_dim})
    rb = synthetic_buffer(size)
    pool = [rb.sample().to(device) for _ in range(32)]  # the same batches for every update measurement
    torchrl_pool = [b.clone() for b in pool]  # CQLLoss writes into its input; keep ours clean
    plain, plain_opt = make_ours(size, device)
    normed, normed_opt = make_ours(size, device, layer_norm=True)
    sac, sac_opt = make_ours(size, device, cql_weight=0.0)
    trl, trl_opt, trl_updater = make_torchrl(size, device)
    torch._dynamo.reset()  # compile afresh, as a pipeline process does: no graphs or dynamic shapes from another size
    compiled, compiled_opt = make_ours(size, device, layer_norm=True, compile=True)
    sac_compiled, sac_compiled_opt = make_ours(size, device, cql_weight=0.0, compile=True)
    compile_seconds = {}
    for name, loss, optimizer in (("compiled", compiled, compiled_opt), ("sac_compiled", sac_compiled, sac_compiled_opt)):
        sync()
        t0 = time.perf_counter()
        update_step(loss, optimizer, pool[0], TAU)  # compiles the loss's forward and backward
        sync()
        compile_seconds[name] = time.perf_counter() - t0
    fns = {
        "plain": lambda k: update_step(plain, plain_opt, pool[k % len(pool)], TAU),
        "layer_norm": lambda k: update_step(normed, normed_opt, pool[k % len(pool)], TAU),
        "compiled": lambda k: update_step(compiled, compiled_opt, pool[k % len(pool)], TAU),
        "torchrl": lambda k: torchrl_update(trl, trl_opt, trl_updater, torchrl_pool[k % len(pool)]),
        "sac": lambda k: update_step(sac, sac_opt, pool[k % len(pool)], TAU),
        "sac_compiled": lambda k: update_step(sac_compiled, sac_compiled_opt, pool[k % len(pool)], TAU),
    }
    return {**rates_with_sgemm(fns, size, device, sync), "compile_seconds": compile_seconds}


def size_fractions(res, cql_flops, sac_flops) -> dict[str, float]:
    """Fraction of the arithmetic limit (FLOPs / faster sgemm) that each of our updates reaches."""
    limit = res["sgemm_best"] * 1e9
    return {"plain": cql_flops * res["plain"] / limit, "layer_norm": cql_flops * res["layer_norm"] / limit,
            "compiled": cql_flops * res["compiled"] / limit, "sac": sac_flops * res["sac"] / limit,
            "sac_compiled": sac_flops * res["sac_compiled"] / limit}


BEST_CQL_NAMES = {"plain": "(a) eager, plain critics", "layer_norm": "(b) eager, layer-normalised critics",
                  "compiled": "(c) compiled, layer-normalised critics"}


def print_size_table(args, hidden, obs_dim, act_dim, what, res, cql_flops, sac_flops) -> str:
    """One markdown table of `--pipeline-sizes`; returns the name of our fastest CQL update."""
    fractions = size_fractions(res, cql_flops, sac_flops)
    best = max(BEST_CQL_NAMES, key=lambda name: res[name])
    rows = args.batch * (3 * args.num_actions + 1)
    print(f"\n### hidden {hidden}x2, obs {obs_dim}, act {act_dim}: {what}\n")
    print(f"| {'measurement':<58} | {'value':>10} | {'unit':<18} |")
    print(f"|{'-' * 60}|{'-' * 12}|{'-' * 20}|")
    row("(a) ours CQL eager, plain critics", f"{res['plain']:.1f}", "updates/s")
    row("(b) ours CQL eager, layer-normalised critics", f"{res['layer_norm']:.1f}", "updates/s")
    row("(c) ours CQL compile=True, layer-normalised critics", f"{res['compiled']:.1f}", "updates/s")
    row("    compile time of (c) (first update)", f"{res['compile_seconds']['compiled']:.1f}", "s")
    row("(d) torchrl CQLLoss eager (+Adam+SoftUpdate)", f"{res['torchrl']:.1f}", "updates/s")
    row("(e) ours SAC mode (cql_weight=0) eager, plain critics", f"{res['sac']:.1f}", "updates/s")
    row("(f) ours SAC mode compile=True, plain critics", f"{res['sac_compiled']:.1f}", "updates/s")
    row("    compile time of (f) (first update)", f"{res['compile_seconds']['sac_compiled']:.1f}", "s")
    row("ours / torchrl: (a) / (d)", f"{res['plain'] / res['torchrl']:.2f}", "x")
    row("ours layer-normalised / torchrl: (b) / (d)", f"{res['layer_norm'] / res['torchrl']:.2f}", "x")
    row("compiled / eager, both layer-normalised: (c) / (b)", f"{res['compiled'] / res['layer_norm']:.2f}", "x")
    row("SAC mode compiled / eager: (f) / (e)", f"{res['sac_compiled'] / res['sac']:.2f}", "x")
    row(f"sgemm ({rows}x{hidden})@({hidden}x{hidden}), faster of torch.matmul, oneDNN",
        f"{res['sgemm_best']:.1f}", "GFLOP/s")
    row("FLOPs per CQL update", f"{cql_flops / 1e9:.3f}", "GFLOP")
    row("FLOPs per SAC update", f"{sac_flops / 1e9:.3f}", "GFLOP")
    row("arithmetic limit CQL (FLOPs / faster sgemm)", f"{res['sgemm_best'] * 1e9 / cql_flops:.1f}", "updates/s")
    row("arithmetic limit SAC", f"{res['sgemm_best'] * 1e9 / sac_flops:.1f}", "updates/s")
    row("fraction of limit, CQL eager (a)", f"{fractions['plain']:.3f}", "")
    row("fraction of limit, CQL eager layer-normalised (b)", f"{fractions['layer_norm']:.3f}", "")
    row("fraction of limit, CQL compiled (c)", f"{fractions['compiled']:.3f}", "")
    row("fraction of limit, SAC eager (e)", f"{fractions['sac']:.3f}", "")
    row("fraction of limit, SAC compiled (f)", f"{fractions['sac_compiled']:.3f}", "")
    row(f"fastest CQL update: {BEST_CQL_NAMES[best]}", f"{fractions[best]:.3f}", "fraction of limit")
    return best


def run_pipeline_sizes(args, device, sync, cores) -> None:
    """`--pipeline-sizes`: a table per size, then the two script lines for the first (64) size."""
    print("(b) and (c) evaluate their critics with torch.baddbmm whatever the line above says: oneDNN takes plain "
          "critics only")
    t_run, first = time.perf_counter(), None
    for hidden, obs_dim, act_dim, what in PIPELINE_SIZES:
        res = measure_size(args, device, sync, hidden, obs_dim, act_dim)
        flops = [sum(flops_per_update(args.batch, obs_dim, act_dim, (hidden,) * 2, args.num_actions, cql=cql).values())
                 for cql in (True, False)]
        best = print_size_table(args, hidden, obs_dim, act_dim, what, res, *flops)
        if first is None:
            first = (res, best, size_fractions(res, *flops)[best])
    print(f"\n(total run time {time.perf_counter() - t_run:.0f} s; {load_note(cores)}; "
          f"peak resident memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB)")
    res, best, fraction = first
    print(f"speedup_vs_torchrl_eager: {res['plain'] / res['torchrl']:.3f}")
    print(f"fraction_of_sgemm_limit: {fraction:.3f}")


def usable_cores() -> int:
    """The cores this process may run on (its affinity), which a shared machine may narrow."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def load_note(cores) -> str:
    """The 1-minute load average: other processes on a shared machine slow every measurement."""
    load = os.getloadavg()[0]
    busy = "  WARNING: other processes compete for the cores, absolute numbers are low" if load > cores + 0.5 else ""
    return f"load average {load:.2f} on {cores} cores{busy}"


def row(name, value, unit=""):
    print(f"| {name:<58} | {value:>10} | {unit:<18} |")


def print_table(args, res, flops, sac_flops):
    ours, sgemm, flops_total = res["ours"], res["sgemm_best"] * 1e9, sum(flops.values())
    rows = args.batch * (3 * args.num_actions + 1)
    print()
    print(f"| {'measurement':<58} | {'value':>10} | {'unit':<18} |")
    print(f"|{'-' * 60}|{'-' * 12}|{'-' * 20}|")
    row("1. ours: update_step (CQL, losses+backward+Adam+Polyak)", f"{ours:.2f}", "updates/s")
    row("2. torchrl CQLLoss eager (+Adam+SoftUpdate)", f"{res['torchrl']:.2f}", "updates/s")
    row("3. ratio ours / torchrl eager", f"{ours / res['torchrl']:.2f}", "x")
    if "cudagraph" in res:
        row("   ours, CUDA graph (cuda_graph_update)", f"{res['cudagraph']:.2f}", "updates/s")
        row("   ours CUDA graph / ours eager", f"{res['cudagraph'] / ours:.2f}", "x")
    if res["compile_seconds"] is not None:
        row("   ours, torch.compile(update_step)", f"{res['compiled']:.2f}", "updates/s")
        row("   ours compiled / ours eager", f"{res['compiled'] / ours:.2f}", "x")
        row("   compile time (first call)", f"{res['compile_seconds']:.0f}", "s")
    split_total = sum(res["split"].values())
    for phase, ms in res["split"].items():
        row(f"4. time split: {phase}", f"{ms:.2f}", f"ms ({100 * ms / split_total:.0f}%)")
    row("   time split: sum (incl. sampling)", f"{split_total:.2f}", f"ms ({1e3 / split_total:.2f}/s)")
    for part, f in flops.items():
        row(f"5. FLOPs: {part}", f"{f / 1e9:.3f}", "GFLOP")
    row("   FLOPs per CQL update", f"{flops_total / 1e9:.3f}", "GFLOP")
    row(f"   sgemm ({rows}x{args.hidden})@({args.hidden}x{args.hidden}), torch.matmul, timed with 1-2",
        f"{res['sgemm']:.1f}", "GFLOP/s")
    if res["sgemm_onednn"] is not None:
        row("   the same, oneDNN fp32 matmul, timed with 1-2", f"{res['sgemm_onednn']:.1f}", "GFLOP/s")
    for name, g in res["gemm"].items():
        row(f"   {name}", f"{g:.1f}", "GFLOP/s")
    row("   arithmetic limit (FLOPs / faster sgemm)", f"{sgemm / flops_total:.2f}", "updates/s")
    row("   achieved: FLOPs x updates/s", f"{flops_total * ours / 1e9:.1f}", "GFLOP/s")
    row("   fraction of sgemm limit (faster sgemm)", f"{flops_total * ours / sgemm:.3f}", "")
    row("   fraction of the torch.matmul sgemm limit", f"{flops_total * ours / (res['sgemm'] * 1e9):.3f}", "")
    row("6. ours, SAC mode (cql_weight=0)", f"{res['sac']:.2f}", "updates/s")
    row("   SAC mode fraction of sgemm limit", f"{sac_flops * res['sac'] / sgemm:.3f}",
        f"({sac_flops / 1e9:.2f} GFLOP/update)")
    row(f"   replay sampling (batch {args.batch})", f"{res['batches_per_s']:.0f}", "batches/s")
    row("   replay sampling", f"{res['batches_per_s'] * args.batch / 1e3:.0f}", "k transitions/s")
    row("   collector Pendulum-v1, frames_per_batch 1000, random", f"{res['fps_random']:.0f}", "frames/s")
    row("   collector Pendulum-v1, frames_per_batch 1000, actor", f"{res['fps_actor']:.0f}", "frames/s")
    row("7. peak resident memory (ru_maxrss)", f"{res['peak_mib']:.0f}", "MiB")


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    sync = make_sync(device)
    cores = usable_cores()
    torch.set_num_threads(args.threads or cores)
    torch.manual_seed(0)
    print(f"torch {torch.__version__} | threads {torch.get_num_threads()} of {cores} cores | CPU {cpu_model()} | "
          f"device {device}" + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""))
    if args.pipeline_sizes:
        sizes = ", ".join(f"{h}x2/{o}/{a}" for h, o, a, _ in PIPELINE_SIZES)
        print(f"--pipeline-sizes: batch {args.batch}, N {args.num_actions}, sizes (hidden/obs/act) {sizes}, "
              f"{args.seconds:g} s per measurement, warmup {args.warmup}" + (" (quick)" if args.quick else ""))
    else:
        print(f"batch {args.batch}, hidden {args.hidden}x2, obs {args.obs_dim}, act {args.act_dim}, "
              f"N {args.num_actions}, {args.seconds:g} s per measurement, warmup {args.warmup}"
              + (" (quick)" if args.quick else ""))
    print(f"{load_note(cores)} | OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    malloc_tuned = keep_freed_memory()
    print(f"malloc tuning (components.allocator.keep_freed_memory): {'on' if malloc_tuned else 'off'}"
          f" | {ENV_SWITCH}={os.environ.get(ENV_SWITCH, 'unset')}")
    probe = torch.zeros(1, 1, device=device)
    onednn = EnsembleMLP.use_onednn and onednn_ensemble.available_for(probe, [probe, probe], torch.nn.ReLU())
    print("critic ensemble matmuls: " + (f"oneDNN fp32 (components/onednn_ensemble.py) on calls of at least "
                                         f"{EnsembleMLP.onednn_min_rows} rows, torch.baddbmm on the others"
                                         if onednn else "torch.baddbmm"))
    if args.pipeline_sizes:
        run_pipeline_sizes(args, device, sync, cores)
        return
    t_run = time.perf_counter()

    rb = synthetic_buffer(args)
    res = measure_updates(args, device, sync, rb)
    res.update(measure_rest(args, device, sync, rb))
    res["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    hidden = (args.hidden,) * 2
    flops = flops_per_update(args.batch, args.obs_dim, args.act_dim, hidden, args.num_actions)
    sac_flops = sum(flops_per_update(args.batch, args.obs_dim, args.act_dim, hidden, args.num_actions,
                                     cql=False).values())
    print_table(args, res, flops, sac_flops)
    print(f"(total run time {time.perf_counter() - t_run:.0f} s; {load_note(cores)})")

    if args.profile:
        profile_ours(*res["profile_target"], args.profile, args.warmup)

    print(f"speedup_vs_torchrl_eager: {res['ours'] / res['torchrl']:.3f}")
    print(f"fraction_of_sgemm_limit: {sum(flops.values()) * res['ours'] / (res['sgemm_best'] * 1e9):.3f}")


def compiled_update(args, device, pool, sync):
    """torch.compile(update_step) on a fresh loss: (update function of k, seconds of the first call).

    Dynamo breaks the graph at the `update_count < bc_steps` test, at `zero_grad` and at
    `backward` (compiled autograd is off), so this compiles the forward pieces and the optimizer step.
    """
    loss, optimizer = make_ours(args, device)
    step = torch.compile(update_step)
    t0 = time.perf_counter()
    step(loss, optimizer, pool[0], TAU)
    sync()
    return (lambda k: step(loss, optimizer, pool[k % len(pool)], TAU)), time.perf_counter() - t0


if __name__ == "__main__":
    main()
