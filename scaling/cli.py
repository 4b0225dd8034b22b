"""What `launch.py` does: join the hosts, validate, run the experiment, report errors clearly.

Errors in the user's input (config fields, data paths, unreadable checkpoints) are printed
as one line naming the field and the fix, with exit status 2; nothing already written in
the workdir is touched.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any

import jax
from absl import logging as absl_logging

from scaling import _env, parallel

log = logging.getLogger(__name__)


def default_workdir(config_arg: str) -> str:
    path, _, preset = config_arg.partition(":")
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join("runs", f"{stem}_{preset}" if preset else stem)


def _fail(msg: str) -> None:
    if os.environ.get("SCALING_DEBUG") == "1":
        raise
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def launch(config: Any, workdir: str, *, coordinator_address: str | None = None,
           num_processes: int | None = None, process_id: int | None = None) -> dict:
    import experiments
    from scaling.train import Diverged

    # Our progress lines at INFO; libraries (Orbax, TF) only at WARNING and above.
    absl_logging.set_verbosity(absl_logging.WARNING)
    for name in ("scaling", "experiments"):
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        parallel.initialize_distributed(coordinator_address, num_processes, process_id)
    except Exception as e:  # a wrong address or count: say so, no traceback
        _fail(f"multi-host start failed ({type(e).__name__}: {e}); check --coordinator_address, "
              "--num_processes and --process_id.")
    _env.enable_compilation_cache()
    try:
        exp = experiments.get(config.get("experiment", "train"))
        exp.validate(config, jax.device_count())
    except ValueError as e:
        _fail(str(e))
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.txt"), "w") as f:
            f.write(str(config))
    log.info("%s on %d device(s) x %d process(es) -> %s", config.get("experiment", "train"),
                 jax.device_count(), jax.process_count(), workdir)
    try:
        result = exp.run(config, workdir)
    except (ValueError, FileNotFoundError, Diverged) as e:
        _fail(str(e))
    if jax.process_index() == 0:
        print({k: v for k, v in result.items() if not isinstance(v, (dict, list))})
    return result
