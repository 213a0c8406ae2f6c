"""fxopt.train.distill: students from the passes (pruned, low-rank, QAT) move toward their teacher; each loss
(logit KL, output MSE/cosine, hidden states with a layer map and projections, attention maps) computes what it
says; the progress bar and loss-curve PNG; the student given is left unchanged; errors.

Real data: the digits CNN (tests/passes/test_prune_digits.py) and MiniLM (tests/passes/test_prune_minilm.py).
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.errors import PassError
from fxopt.train.distill_losses import AttentionKL, LogitKL, OutputCosine, layer_map
from tests.harness import AttentionBlock, ResidualBlock, Sequence_

STEPS, LR = 40, 3e-3


def stack(blocks: int, width: int = 16, heads: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers = []
    for _ in range(blocks):
        layers += [AttentionBlock(width, heads, causal=False), ResidualBlock(width, 2 * width, "gelu")]
    return Sequence_(layers).eval()


def batches(width: int = 16, count: int = 6, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 5, width, generator=gen),) for _ in range(count)]


def distance(a, b, data) -> float:
    return sum(F.mse_loss(a(*x), b(*x)).item() for x in data) / len(data)


@pytest.fixture(scope="module")
def teacher_and_pruned():
    data = batches()
    teacher = fxopt.capture(stack(2), data[0])
    pruned = fxopt.Pipeline("prune-channels{ratio=0.5}")(teacher).graph
    return teacher, pruned, data


# -------------------------------------------------------------- students
@pytest.mark.parametrize("losses", [("mse",), {"mse": 1.0, "hidden": 1.0}, {"mse": 1.0, "attention": 0.1},
                                    {"cosine": 1.0}])
def test_a_pruned_student_moves_toward_its_teacher(teacher_and_pruned, losses):
    teacher, pruned, data = teacher_and_pruned
    snapshot = {k: t.clone() for k, t in pruned.params().items()}
    history = []
    student = fxopt.train.distill(pruned, teacher, data, steps=STEPS, lr=LR, losses=losses, progress=False,
                                  history=history)
    assert len(history) == STEPS and sum(history[-5:]) < sum(history[:5])
    assert distance(student, teacher, data) < 0.5 * distance(pruned, teacher, data)
    assert {k: t.shape for k, t in student.params().items()} == {k: t.shape for k, t in snapshot.items()}
    assert all(torch.equal(pruned.params()[k], t) for k, t in snapshot.items())  # the student given is unchanged
    student.verify()


def test_a_low_rank_student_trains_its_factors(teacher_and_pruned):
    teacher, _, data = teacher_and_pruned
    low_rank = fxopt.Pipeline("low-rank{rank=3}")(teacher).graph
    factors = {k: t.clone() for k, t in low_rank.params().items() if "lowrank" in k}
    assert factors
    student = fxopt.train.distill(low_rank, teacher, data, steps=STEPS, lr=LR, losses=("mse",), progress=False)
    assert all(not torch.equal(student.params()[k], t) for k, t in factors.items())
    assert distance(student, teacher, data) < distance(low_rank, teacher, data)


def test_a_qat_student_trains_through_fake_quant_and_stays_qdq(teacher_and_pruned):
    """A pruned, then int8 student: QAT through fake quantization, frozen back to Q/DQ."""
    teacher, pruned, data = teacher_and_pruned
    calibrated = fxopt.calibrate(pruned, data, progress=False)
    quantized = fxopt.Pipeline("insert-qdq{scheme=static}")(calibrated).graph
    student = fxopt.train.distill(quantized, teacher, data, steps=STEPS, lr=LR, losses=("mse",), progress=False)
    assert student.format() == quantized.format()  # frozen back to the same Q/DQ nodes, new int8 codes
    assert any(not torch.equal(student.params()[k], t) for k, t in quantized.params().items() if "int8" in k)
    assert distance(student, teacher, data) < distance(quantized, teacher, data)


def test_a_shallower_narrower_student_maps_layers_and_projects_hidden_states():
    """Teacher: 4 blocks of width 16; student: 2 blocks of width 8 (a separate model, read out to 4 classes)."""
    data = batches(width=16)
    teacher = fxopt.capture(nn.Sequential(stack(4), nn.Linear(16, 4)).eval(), data[0])
    student_model = nn.Sequential(nn.Linear(16, 8), stack(2, width=8, heads=2, seed=3), nn.Linear(8, 4)).eval()
    student = fxopt.capture(student_model, data[0])
    # 4 LayerNorms in the student, 8 in the teacher: student layer i reads teacher layer 2i + 1
    assert layer_map(4, 8) == [1, 3, 5, 7] and layer_map(2, 6) == [2, 5] and layer_map(3, 3) == [0, 1, 2]
    history = []
    trained = fxopt.train.distill(student, teacher, data, steps=STEPS, lr=LR,
                                  losses={"kl": {"temperature": 2.0}, "hidden": 0.5}, progress=False, history=history)
    assert sum(history[-5:]) < sum(history[:5])
    kl = lambda g: sum(LogitKL()([g(*x)], [teacher(*x)], None, x).item() for x in data)  # noqa: E731
    assert kl(trained) < kl(student)


# ----------------------------------------------------------------- losses
def test_logit_kl_is_temperature_scaled_kl_of_the_softmaxes():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, 7, generator=gen), torch.randn(3, 5, 7, generator=gen)
    temperature = 3.0
    p, q = F.softmax(t / temperature, -1), F.softmax(s / temperature, -1)
    expected = (p * (p.log() - q.log())).sum(-1).mean() * temperature ** 2
    assert math.isclose(LogitKL(temperature=temperature)([s], [t], None, ()).item(), expected.item(), rel_tol=1e-5)


def test_attention_kl_and_pooled_cosine_are_zero_only_on_agreement():
    gen = torch.Generator().manual_seed(1)
    maps = F.softmax(torch.randn(2, 4, 3, 3, generator=gen), -1)
    assert AttentionKL()([maps], [maps], None, ()).abs().item() < 1e-6
    fewer_heads = maps[:, :2]  # pruned heads: compared head-averaged
    assert AttentionKL()([fewer_heads], [maps], None, ()).item() > 1e-4
    states, mask = torch.randn(2, 3, 4, generator=gen), torch.tensor([[1, 1, 0], [1, 0, 0]])
    changed_padding = states.clone()
    changed_padding[0, 2], changed_padding[1, 1:] = 5.0, -5.0
    pooled = OutputCosine(mask_input=1, pooled=True)
    assert pooled([changed_padding], [states], None, (None, mask)).abs().item() < 1e-6  # padding does not count
    assert OutputCosine()([changed_padding], [states], None, ()).item() > 0.01


# ------------------------------------------------------------ bar, curve
def test_progress_bar_and_loss_curve_png(teacher_and_pruned, tmp_path, capsys):
    teacher, pruned, data = teacher_and_pruned
    path = tmp_path / "loss.png"
    fxopt.train.distill(pruned, teacher, data, steps=5, lr=LR, losses=("mse",), curve=str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert "distill" in capsys.readouterr().err


# ----------------------------------------------------------------- errors
def test_errors_say_what_to_do(teacher_and_pruned):
    teacher, pruned, data = teacher_and_pruned
    with pytest.raises(PassError, match=r"distill: unknown loss 'l1'; valid losses: kl, mse, cosine, hidden"):
        fxopt.train.distill(pruned, teacher, data, steps=1, losses=("l1",))
    with pytest.raises(PassError, match=r"the teacher is not an fxopt Graph; capture the teacher with fxopt.capture"):
        fxopt.train.distill(pruned, teacher.module, data, steps=1, losses=("hidden",))
    with pytest.raises(PassError, match=r"mse: output=3 but the student has 1 outputs"):
        fxopt.train.distill(pruned, teacher, data, steps=1, losses={"mse": {"output": 3}})
    with pytest.raises(PassError, match=r"mask_input=0 is an input of shape \[4, 5, 16\], not \[batch, seq\]"):
        fxopt.train.distill(pruned, teacher, data, steps=1, losses={"mse": {"mask_input": 0}}, progress=False)
    with pytest.raises(PassError, match=r"steps=0 must be a positive integer"):
        fxopt.train.distill(pruned, teacher, data, steps=0)
