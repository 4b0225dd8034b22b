"""Per-device memory of a train step, train state replicated (data=8) vs split (fsdp=8).

    python benchmarks/fsdp_memory.py                          # ViT-B/16 and ViT-H/14, 224 px
    python benchmarks/fsdp_memory.py --models vit_b_16 --batch-per-device 4 --optimizer sgd

On 8 (forced) CPU devices, lowers and compiles the train step the trainer builds
(`scaling.train.state.abstract_state` + `parallel.state_shardings` + `make_train_step`) and
prints, per device: the train state's bytes (parameters + optimizer state + BN statistics,
from the shardings), and XLA's memory analysis of the compiled step (arguments, outputs,
temporaries, peak = arguments + outputs + temporaries - donated aliases;
`scaling.profile.compiled_memory`). Nothing is initialised or run: shapes only, so a ViT-H/14
(632 M parameters) costs only its compile time.
Figures are printed, never asserted.
"""
import argparse
import os
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import scaling  # noqa: E402,F401  (CPU XLA defaults before jax loads)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from scaling import parallel, profile  # noqa: E402
from scaling.models import create_model  # noqa: E402
from scaling.train import optim  # noqa: E402
from scaling.train.config import default_train_config  # noqa: E402
from scaling.train.state import abstract_state, batch_spec  # noqa: E402
from scaling.train.step import make_train_step  # noqa: E402


def _mb(n: float) -> str:
    return f"{n / 2 ** 20:10.1f}"


def measure(name: str, fsdp: int, batch: int, resolution: int, optimizer: str) -> dict:
    """Per-device bytes of the train step of `name` on an 8-device mesh with `fsdp`."""
    model = create_model(name, num_classes=1000)
    x1 = jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32)
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    variables = jax.eval_shape(lambda x: model.init(rngs, x, train=False), x1)
    cfg = default_train_config()
    cfg.optimizer = optimizer
    tx = optim.make_optimizer(cfg, optax.constant_schedule(cfg.lr))
    mesh = parallel.make_mesh(8, fsdp=fsdp)
    sharding = parallel.default_sharding_config()
    state = abstract_state(variables, tx, lambda s: parallel.state_shardings(s, mesh, sharding))
    batch_in = batch_spec(batch, (resolution, resolution, 3), parallel.batch_sharding(mesh))
    step = make_train_step(model, tx, mesh,
                           state_sharding=jax.tree.map(lambda s: s.sharding, state))
    t = time.perf_counter()
    compiled = step.lower(state, batch_in).compile()
    mem = profile.compiled_memory(compiled)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    return {"params": n_params, "state": parallel.state_bytes_per_device(state),
            "state_total": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)),
            "compile_s": time.perf_counter() - t, **mem}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vit_b_16", "vit_h_14"])
    p.add_argument("--batch-per-device", type=int, default=1)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--optimizer", default="adamw", help="sgd | adamw | adam | rmsprop")
    args = p.parse_args()
    batch = 8 * args.batch_per_device
    print(f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].platform}; global batch "
          f"{batch} at {args.resolution} px, {args.optimizer}; per-device MiB (compile only)")
    print(f"{'model':10s} {'mesh':14s} {'params':>12s} {'state':>10s} {'arguments':>10s} "
          f"{'outputs':>10s} {'temp':>10s} {'peak':>10s} {'state/rep':>9s} {'peak/rep':>9s} "
          f"{'compile_s':>9s}")
    for name in args.models:
        rows = {}
        for fsdp in (1, 8):
            rows[fsdp] = r = measure(name, fsdp, batch, args.resolution, args.optimizer)
            rep = rows[1]
            mesh = "data=8" if fsdp == 1 else "fsdp=8"
            print(f"{name:10s} {mesh:14s} {r['params']:12,d} {_mb(r['state'])} "
                  f"{_mb(r['argument_bytes'])} {_mb(r['output_bytes'])} {_mb(r['temp_bytes'])} "
                  f"{_mb(r['peak_bytes'])} {r['state'] / rep['state']:9.3f} "
                  f"{r['peak_bytes'] / rep['peak_bytes']:9.3f} {r['compile_s']:9.1f}", flush=True)


if __name__ == "__main__":
    main()
