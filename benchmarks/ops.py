"""Single-op speed on CPU: depthwise convolution as XLA's grouped conv (CPU conv flag on, the
default, and off), as the slice form of `scaling.models.layers.depthwise_conv`, and in PyTorch
(`F.conv2d(groups=C)`, default and channels_last memory format, when `import torch` works),
plus a dense 3x3 conv for reference. Forward, gradient wrt the input, wrt the weight, and
forward + both gradients, median ms over `--reps` calls after a warm-up, torch-style symmetric
padding throughout.

    python benchmarks/ops.py                         # batch 32, every case, a table
    python benchmarks/ops.py --batch 8 --cases dw3_112 --json

Figures are printed, never asserted.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import scaling  # noqa: E402,F401  (CPU XLA defaults before jax loads)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from scaling import _env  # noqa: E402
from scaling.models.layers import depthwise_conv, sym_padding  # noqa: E402
from vs_pytorch import torch_available  # noqa: E402

# name: (size, channels, kernel, stride, depthwise)
CASES = {
    "dw3_112": (112, 96, 3, 1, True),     # MobileNetV2 / EfficientNet early stage
    "dw5s2_112": (112, 96, 5, 2, True),
    "dw3_56": (56, 144, 3, 1, True),
    "dw5s2_56": (56, 144, 5, 2, True),    # EfficientNet-B0 stage 3
    "dense3_112": (112, 96, 3, 1, False),
}
OPS = ("fwd", "grad_x", "grad_w", "fwd_bwd")
COLUMNS = ("xla_flag_on", "xla_flag_off", "slices", "torch", "torch_cl")


def _time(fn, reps: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def jax_times(case: str, impl: str, batch: int, reps: int) -> dict[str, float]:
    size, c, k, s, dw = CASES[case]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, size, size, c)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, 1 if dw else c, c)), jnp.float32)
    pad = sym_padding(k)
    if dw:
        f = lambda x, w: depthwise_conv(x, w, s, pad, impl=impl)  # noqa: E731
    else:
        f = lambda x, w: jax.lax.conv_general_dilated(x, w, (s, s), pad,  # noqa: E731
                                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
    g = jnp.ones(jax.eval_shape(f, x, w).shape, jnp.float32)
    fns = {"fwd": jax.jit(f),
           "grad_x": jax.jit(lambda x, w, g: jax.vjp(lambda x: f(x, w), x)[1](g)),
           "grad_w": jax.jit(lambda x, w, g: jax.vjp(lambda w: f(x, w), w)[1](g)),
           "fwd_bwd": jax.jit(lambda x, w, g: (lambda y, vjp: (y, vjp(g)))(*jax.vjp(f, x, w)))}
    args = {"fwd": (x, w)}
    return {op: _time(lambda: jax.block_until_ready(fn(*args.get(op, (x, w, g)))), reps)
            for op, fn in fns.items()}


def torch_times(case: str, batch: int, reps: int, channels_last: bool) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    size, c, k, s, dw = CASES[case]
    torch.set_num_threads(2)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, c, size, size).to(memory_format=fmt).requires_grad_()
    w = torch.randn(c, 1 if dw else c, k, k).requires_grad_()
    conv = lambda: F.conv2d(x, w, stride=s, padding=k // 2, groups=c if dw else 1)  # noqa: E731
    with torch.no_grad():
        g = torch.ones_like(conv())

    def grads(*wrt):
        return lambda: torch.autograd.grad(conv(), wrt, g)

    def fwd():
        with torch.no_grad():
            conv()

    fns = {"fwd": fwd, "grad_x": grads(x), "grad_w": grads(w), "fwd_bwd": grads(x, w)}
    return {op: _time(fn, reps) for op, fn in fns.items()}


def flag_off_times(args) -> dict[str, dict[str, float]]:
    """XLA's conv in a subprocess without the CPU conv flag (it is process-wide)."""
    env = _env.environ_without_conv_flag()
    cmd = [sys.executable, os.path.abspath(__file__), "--batch", str(args.batch), "--reps",
           str(args.reps), "--cases", *args.cases, "--columns", "xla_flag_off", "--json"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    rows = json.loads(res.stdout.strip().splitlines()[-1])["results"]
    return {case: cols["xla_flag_off"] for case, cols in rows.items()}


def run(args) -> dict:
    flag_on = "ynn_fusion" in os.environ.get("XLA_FLAGS", "")
    columns = [c for c in args.columns if not c.startswith("torch") or torch_available()]
    results: dict[str, dict[str, dict[str, float]]] = {case: {} for case in args.cases}
    if "xla_flag_off" in columns and flag_on:
        for case, times in flag_off_times(args).items():
            results[case]["xla_flag_off"] = times
    for case in args.cases:
        dw = CASES[case][4]
        for col in columns:
            if col == "xla_flag_off" and flag_on:
                continue
            if col.startswith("xla") and col != ("xla_flag_on" if flag_on else "xla_flag_off"):
                continue
            if col == "slices" and not dw:
                continue
            if col.startswith("torch"):
                results[case][col] = torch_times(case, args.batch, args.reps, col == "torch_cl")
            else:
                results[case][col] = jax_times(case, "slices" if col == "slices" else "conv",
                                               args.batch, args.reps)
    return {"batch": args.batch, "reps": args.reps, "jax": jax.__version__,
            "torch": columns.count("torch") > 0, "results": results}


def print_table(out: dict) -> None:
    cols = [c for c in COLUMNS if any(c in r for r in out["results"].values())]
    print(f"batch {out['batch']}, median of {out['reps']} calls, ms (jax {out['jax']}; "
          f"symmetric padding; NHWC for jax)")
    print(f"{'case':12s} {'op':8s}" + "".join(f"{c:>13s}" for c in cols))
    for case, res in out["results"].items():
        size, c, k, s, dw = CASES[case]
        label = f"{'dw' if dw else 'dense'} {k}x{k}/{s} {size}x{size}x{c}"
        print(label)
        for op in OPS:
            cells = "".join(f"{res[col][op]:13.1f}" if col in res else f"{'-':>13s}" for col in cols)
            print(f"{'':12s} {op:8s}{cells}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--columns", nargs="+", default=list(COLUMNS), choices=list(COLUMNS))
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    out = run(args)
    if args.json:
        print(json.dumps(out))
    else:
        print_table(out)


if __name__ == "__main__":
    main()
