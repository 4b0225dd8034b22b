"""Every model in ../shared/reference/params.json exists in our registry with exactly the
reference parameter and BatchNorm-statistic counts, and MACs within 1 % (shapes only)."""
import pytest

from scaling.models import list_models
from tests.conftest import SHARED
from tests.helpers import check_reference_counts


def _reference_names():
    import json
    path = SHARED / "reference" / "params.json"
    return sorted(json.loads(path.read_text())["models"]) if path.exists() else []


def test_every_reference_model_is_registered(reference_params):
    missing = sorted(set(reference_params) - set(list_models()))
    assert not missing, f"not in the registry: {missing}"


@pytest.mark.parametrize("name", _reference_names())
def test_reference_counts(name, reference_params):
    if name not in list_models():
        pytest.fail(f"{name} is not registered")
    check_reference_counts(name, reference_params)
