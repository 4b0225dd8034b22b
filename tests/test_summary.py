"""The summary CLI prints the reference figures, as a table or one JSON object per model."""
import json

from scaling import summary


def test_json_rows(capsys):
    assert summary.main(["resnet18", "wrn_28_10", "--json", "--no-memory"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["name"] for r in rows] == ["resnet18", "wrn_28_10"]
    r18, wrn = rows
    assert r18["params"] == 11_689_512 and r18["batch_stats"] == 9_600
    assert abs(r18["gmacs"] - 1.8141) < 0.01 * 1.8141
    assert wrn["params"] == 36_479_194 and abs(wrn["gmacs"] - 5.2433) < 0.05
    assert abs(r18["size_mb"] - (11_689_512 + 9_600) * 4 / 1e6) < 1e-9


def test_table_with_train_memory(capsys):
    assert summary.main(["wrn_16_1", "--batch", "8", "--num-classes", "5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["model", "input", "params", "bn_stats", "GMACs", "size_MB", "train_MB"]
    cols = out[1].split()
    assert cols[0] == "wrn_16_1" and cols[1] == "32x32x3"
    assert float(cols[-1]) > float(cols[-2]) > 0  # a train step needs more than the weights


def test_unknown_name_is_an_error(capsys):
    assert summary.main(["resnet5O", "--no-memory"]) == 2
    assert "unknown model 'resnet5O'" in capsys.readouterr().err
