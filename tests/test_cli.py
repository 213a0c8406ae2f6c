"""The ``fxopt`` command line: optimize a factory's model, run the artifact on safetensors inputs, list passes."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import fxopt
from fxopt.cli import main


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def factory():
    torch.manual_seed(0)
    return Tiny().eval(), (torch.randn(4, 16),)


def factory_with_calibration():
    model, example = factory()
    return model, example, [example] + [(torch.randn(4, 16),) for _ in range(3)]


def not_a_factory():
    return 42


@pytest.mark.parametrize("target, make", [("eager", "factory"), ("x86-int8", "factory_with_calibration")])
def test_optimize_then_run_reproduces_the_in_process_result(tmp_path, capsys, target, make):
    out = tmp_path / "artifact"
    assert main(["optimize", f"tests.test_cli:{make}", "--target", target, "--out", str(out)]) == 0
    assert (out / "manifest.json").is_file() and "saved" in capsys.readouterr().out
    model, (x,) = factory()
    save_file({"input_0": x}, str(tmp_path / "in.safetensors"))
    assert main(["run", str(out), "--inputs", str(tmp_path / "in.safetensors"),
                 "--outputs", str(tmp_path / "out.safetensors")]) == 0
    (got,) = load_file(str(tmp_path / "out.safetensors")).values()
    assert torch.equal(got, fxopt.load(out)(x.clone()))  # the CLI runs exactly what the API loads
    expected = model(x).detach()
    bound = 1e-6 if target == "eager" else 0.05  # int8 activations and weights: about 1% per layer
    assert got.shape == expected.shape and ((got - expected).norm() / expected.norm()).item() <= bound


def test_passes_lists_every_registered_pass_and_preset(capsys):
    from fxopt.passes import registered_passes, registered_presets
    assert main(["passes"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in registered_passes()) and all(p in text for p in registered_presets())
    assert "insert-qdq" in text and "options: scheme='static'" in text


def test_bad_factory_and_missing_inputs_give_clear_errors(tmp_path, capsys):
    assert main(["optimize", "tests.test_cli", "--out", str(tmp_path / "a")]) == 2
    assert "is not MODULE:FACTORY" in capsys.readouterr().err
    assert main(["optimize", "tests.test_cli:nowhere", "--out", str(tmp_path / "a")]) == 2
    assert "cannot be loaded" in capsys.readouterr().err
    assert main(["optimize", "tests.test_cli:not_a_factory", "--out", str(tmp_path / "a")]) == 2
    assert "must return (model, example_inputs)" in capsys.readouterr().err
    assert main(["optimize", "tests.test_cli:factory", "--out", str(tmp_path / "a")]) == 0
    save_file({"y": torch.zeros(4, 16)}, str(tmp_path / "in.safetensors"))
    assert main(["run", str(tmp_path / "a"), "--inputs", str(tmp_path / "in.safetensors")]) == 2
    assert "no tensor named x" in capsys.readouterr().err


def test_optimize_with_a_tolerance_searches_and_the_report_shows_it(tmp_path, capsys):
    out = tmp_path / "artifact"
    assert main(["optimize", "tests.test_cli:factory_with_calibration", "--target", "x86-int8",
                 "--tolerance", "cosine=0.9999999", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fxopt search (x86-int8, tolerance cosine >= 0.9999999)" in printed
    assert main(["report", str(out), "--html", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert "int8" in page and "<svg" in page  # both candidates, the Pareto plot


def test_a_malformed_tolerance_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        main(["optimize", "tests.test_cli:factory", "--tolerance", "cosine:0.9", "--out", "x"])
    assert "is not cosine=C, max_rel_err=E or a number" in capsys.readouterr().err
