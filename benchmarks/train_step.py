"""Train-step speed of one model: images/s, compile time, achieved GFLOP/s and its fraction of
this machine's matmul rate, and the real input pipeline against in-memory data.

    python benchmarks/train_step.py --model wrn_16_2 --batch 128 --resolution 32
    python benchmarks/train_step.py --model wrn_16_1 --compare-xla-flag   # flag on vs off
    python benchmarks/train_step.py --model resnet18 --dtype bfloat16      # bf16 compute
    python benchmarks/train_step.py --model mobilenet_v2 --batch 32 --profile  # where time goes
    python benchmarks/train_step.py --model resnet50 --batch 256 --dtype bfloat16 --peak-tflops 312

`step_gflop` is XLA's count for the compiled step over all devices (it counts what XLA
executes, e.g. a grouped convolution it expands into a dense one, and elementwise work);
`useful_gflop` is the model's own MAC count (scaling.profile) x 2 FLOPs x 3 (forward and
backward) x batch, the work the step must do.

`--peak-tflops` is one device's peak for the compute dtype (dense, no sparsity; e.g. A100
bf16 312, H100 SXM bf16 989, TPU v4 bf16 275; float32 on GPUs is TF32 unless matmul precision
is 'highest'). With it the script prints model FLOPs utilisation: `mfu` = useful FLOP/s over
the peak of all devices, `mfu_xla` = XLA's FLOP/s over the same peak (a hardware utilisation
that includes what XLA executes beyond the model's MACs).

Figures are printed, never asserted.
"""
import argparse
import collections
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import scaling  # noqa: E402,F401  (CPU XLA defaults before jax loads)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from scaling import data as data_lib  # noqa: E402
from scaling import _env, parallel, profile  # noqa: E402
from scaling.models import create_model, model_info  # noqa: E402
from scaling.train.loop import COMPUTE_DTYPES  # noqa: E402
from scaling.train.state import create_state  # noqa: E402
from scaling.train.step import ACCUMULATE, make_train_step  # noqa: E402


def matmul_gflops(n: int = 2048, reps: int = 10) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        out = f(a)
    out.block_until_ready()
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def op_profile(compiled, state, batch, steps: int = 2, top: int = 25) -> str:
    """Where one compiled step's time goes, from a JAX profiler trace: milliseconds per step of
    each XLA op (summed over the CPU threads that ran it), grouped by direction (forward or
    backward) and by the jax op it came from, plus how busy the threads were."""
    meta = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = .*?\s([a-z][a-z\-]*)\((.*)$",
                         compiled.as_text(), re.M):
        src = re.search(r'op_name="([^"]+)"', m.group(3))
        meta[m.group(1)] = (m.group(2), src.group(1) if src else "")
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        t = time.perf_counter()
        for _ in range(steps):
            state, m = compiled(state, batch)
        jax.block_until_ready(m)
        wall_ms = (time.perf_counter() - t) / steps * 1e3
        jax.profiler.stop_trace()
        data = jax.profiler.ProfileData.from_file(
            glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[-1])
    per_op, per_thread = collections.Counter(), collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            for e in line.events:
                if e.name in meta:
                    per_op[e.name] += e.duration_ns / steps / 1e6
                    per_thread[line.name] += e.duration_ns / steps / 1e6
    groups, rows = collections.Counter(), []
    for op, ms in per_op.most_common():
        kind, src = meta[op]
        kind = "ynn_fusion (matmul/conv)" if op.startswith("ynn_fusion") else kind
        direction = "bwd" if "transpose(" in src else "fwd" if src else "---"
        what = kind if kind.startswith(("convolution", "ynn")) or not src else src.rsplit("/", 1)[-1]
        groups[(direction, what)] += ms
        rows.append(f"{ms:9.1f}  {direction}  {op:32.32s} {src.split(')/', 1)[-1][:72]}")
    total = sum(per_op.values())
    busy = ", ".join(f"{ms / wall_ms:.0%}" for ms in sorted(per_thread.values(), reverse=True))
    out = [f"wall {wall_ms:.0f} ms/step; ops {total:.0f} thread-ms/step; "
           f"threads busy {busy} of the wall time", "",
           "   thread-ms  share  direction and group (XLA conv / matmul, else the jax op; "
           "--- = no source, e.g. copies)"]
    out += [f"{ms:12.1f} {ms / total:6.1%}  {d} {g}" for (d, g), ms in groups.most_common(top)]
    out += ["", f"top {top} ops (thread-ms/step, direction, XLA op, source)"] + rows[:top]
    return "\n".join(out)


def mfu(useful_flop: float, xla_flop: float | None, step_s: float, peak_tflops: float,
        devices: int) -> dict:
    """Model FLOPs utilisation of a step of `step_s` seconds on `devices` devices whose peak is
    `peak_tflops` each: from the model's own count (`mfu`) and from XLA's (`mfu_xla`)."""
    peak = peak_tflops * 1e12 * devices
    out = {"peak_tflops": peak_tflops * devices, "mfu": round(useful_flop / step_s / peak, 4)}
    if xla_flop:
        out["mfu_xla"] = round(xla_flop / step_s / peak, 4)
    return out


def bench(args) -> dict:
    info = model_info(args.model)
    size = args.resolution or info["resolution"]
    dtype = COMPUTE_DTYPES[args.dtype]
    model = create_model(args.model, num_classes=args.num_classes,
                         **({"dtype": dtype} if args.dtype != "float32" else {}))
    mesh = parallel.make_mesh()
    tx = optax.sgd(0.1, momentum=0.9, nesterov=True)
    state = parallel.replicate(create_state(model, tx, jax.random.PRNGKey(0), (size, size, 3)), mesh)
    shard = parallel.batch_sharding(mesh)
    rng = np.random.default_rng(0)
    batch = {"image": rng.standard_normal((args.batch, size, size, 3)).astype(np.float32),
             "label": rng.integers(0, args.num_classes, args.batch).astype(np.int32)}
    gbatch = parallel.to_global(batch, shard)
    step = make_train_step(model, tx, mesh, compute_dtype=dtype, grad_accum_steps=args.grad_accum_steps,
                           accumulate=args.accumulate)
    t = time.perf_counter()
    compiled = step.lower(state, gbatch).compile()
    compile_s = time.perf_counter() - t
    flops = profile.compiled_flops(compiled)  # XLA's count is per device (the partitioned program)
    flops = flops * jax.device_count() if flops else flops
    state, m = compiled(state, gbatch)  # warm-up
    jax.block_until_ready(m)
    if args.profile:
        print(op_profile(compiled, state, gbatch))
        return {}
    t = time.perf_counter()
    for _ in range(args.steps):
        state, m = compiled(state, gbatch)
    jax.block_until_ready(m)
    step_s = (time.perf_counter() - t) / args.steps
    out = {"model": args.model, "batch": args.batch, "resolution": size,
           "dtype": args.dtype, "grad_accum_steps": args.grad_accum_steps,
           "accumulate": args.accumulate if args.grad_accum_steps > 1 else "-",
           "peak_memory_mb": round(profile.compiled_memory(compiled).get("peak_bytes", 0) / 2 ** 20, 1),
           "cpu_native_bf16": _env.cpu_has_native_bf16(),
           "devices": jax.device_count(),
           "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "compile_s": round(compile_s, 2), "step_s": round(step_s, 4),
           "images_per_s": round(args.batch / step_s, 1)}
    useful = profile.model_stats(model, size)["gmacs"] * 1e9 * 2 * 3 * args.batch
    out["useful_gflop"] = round(useful / 1e9, 2)
    out["useful_gflops"] = round(useful / step_s / 1e9, 1)
    mm = matmul_gflops()
    out["matmul_gflops"] = round(mm, 1)
    out["useful_fraction_of_matmul"] = round(useful / step_s / 1e9 / mm, 3)
    if flops:
        out["step_gflop"] = round(flops / 1e9, 2)
        out["achieved_gflops"] = round(flops / step_s / 1e9, 1)
        out["fraction_of_matmul"] = round(flops / step_s / 1e9 / mm, 3)
    if args.peak_tflops:
        out.update(mfu(useful, flops, step_s, args.peak_tflops, jax.device_count()))
    if args.pipeline and size == 32:
        cfg = data_lib.default_data_config()
        ds = data_lib.build_dataset(cfg, "train", train=True, seed=0)
        n = args.steps
        t = time.perf_counter()
        for _, local in data_lib.prefetch(ds, 0, n, args.batch):
            pass
        out["pipeline_only_images_per_s"] = round(n * args.batch / (time.perf_counter() - t), 1)
        t = time.perf_counter()
        for _, local in data_lib.prefetch(ds, 0, n, args.batch):
            state, m = compiled(state, parallel.to_global(local, shard))
        jax.block_until_ready(m)
        out["with_pipeline_images_per_s"] = round(n * args.batch / (time.perf_counter() - t), 1)
        out["in_memory_images_per_s"] = out["images_per_s"]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="wrn_16_2")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--resolution", type=int, default=0)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--dtype", default="float32", choices=tuple(COMPUTE_DTYPES),
                   help="compute dtype (params stay float32), as train.compute_dtype")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="one device's peak TFLOP/s for --dtype (dense); prints MFU against it")
    p.add_argument("--profile", action="store_true",
                   help="print where the step's time goes, per XLA op, instead of the speed")
    p.add_argument("--no-pipeline", dest="pipeline", action="store_false")
    p.add_argument("--compare-xla-flag", action="store_true",
                   help="also run with SCALING_CPU_CONV_FLAG=0 (XLA's default conv path)")
    p.add_argument("--grad-accum-steps", type=int, default=1,
                   help="microbatches per step (train.grad_accum_steps)")
    p.add_argument("--accumulate", default="auto", choices=ACCUMULATE,
                   help="how microbatches run: scan (in the compiled step), host (a compiled "
                        "microbatch step called k times), auto (host on CPU)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.compare_xla_flag:
        base = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--batch",
                str(args.batch), "--resolution", str(args.resolution), "--num-classes",
                str(args.num_classes), "--steps", str(args.steps), "--dtype", args.dtype,
                "--no-pipeline", "--json"]
        rows = []
        for flag in ("1", "0"):
            env = dict(_env.environ_without_conv_flag(), SCALING_CPU_CONV_FLAG=flag)
            res = subprocess.run(base, env=env, capture_output=True, text=True, check=True)
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        for r, name in zip(rows, ("conv flag on ", "XLA default  ")):
            print(f"{name}: {r['images_per_s']:8.1f} img/s  step {r['step_s']:.3f} s  "
                  f"compile {r['compile_s']:.1f} s  {r.get('achieved_gflops', '?')} GFLOP/s")
        print(f"speed-up: {rows[0]['images_per_s'] / rows[1]['images_per_s']:.2f}x")
        return
    out = bench(args)
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:28s} {v}")


if __name__ == "__main__":
    main()
