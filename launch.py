"""Runs the experiment a config names, on every device of every host.

    python launch.py --config configs/train.py[:preset] [--config.train.lr=0.05] [--workdir W]

Relaunching with the same --workdir resumes. Multi-host: start the same command on every
host (SLURM/TPU detected), or pass --coordinator_address/--num_processes/--process_id.
"""
import scaling  # noqa: F401  (CPU XLA defaults before jax loads)
from absl import app, flags
from ml_collections import config_flags

from scaling import cli

config_flags.DEFINE_config_file("config", None, "Experiment config file[:preset].", lock_config=True)
flags.DEFINE_string("workdir", None, "Output directory (default: runs/<config>[_<preset>]).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for a multi-host run.")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-host run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    F = flags.FLAGS
    cli.launch(F.config, F.workdir or cli.default_workdir(F["config"].config_filename),
               coordinator_address=F.coordinator_address, num_processes=F.num_processes,
               process_id=F.process_id)


if __name__ == "__main__":
    app.run(main)
