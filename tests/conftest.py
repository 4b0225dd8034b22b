"""Test set-up: 8 forced CPU devices so sharding code runs as on an 8-accelerator box."""
import os
import pathlib

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import scaling  # noqa: E402,F401  (sets the CPU convolution flag before jax loads)
import jax  # noqa: E402
import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir():
    """../shared beside the checkout; tests that need it skip cleanly without it."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (reference data lives beside the checkout)")
    return SHARED


@pytest.fixture(scope="session")
def reference_params(shared_dir):
    import json
    return json.loads((shared_dir / "reference" / "params.json").read_text())["models"]


def pytest_report_header(config):
    return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}"
