"""Runs the experiment a config names, on every device of every host.

    python launch.py --config configs/train.py[:preset] [--config.train.lr=0.05] [--workdir W]

Relaunching with the same --workdir resumes (a changed config stops with the differing fields
unless --accept_config_change). Multi-host: start the same command on every host (SLURM/TPU
detected), or pass --coordinator_address/--num_processes/--process_id. See scaling/cli.py.
"""
import sys

import scaling  # noqa: F401  (CPU XLA defaults before jax loads)
from absl import flags, logging

from scaling import cli

flags.adopt_module_key_flags(cli)  # --help lists --workdir, --accept_config_change, ...

if __name__ == "__main__":
    logging.use_absl_handler()  # as absl's app.run: log lines on stderr in absl's format
    cli.main(sys.argv)
