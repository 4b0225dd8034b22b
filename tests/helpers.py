"""Small utilities shared by tests."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT


def run_launch(args: list[str], *, env_extra: dict | None = None, timeout: int = 600,
               devices: int = 8) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
