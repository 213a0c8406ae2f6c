"""sparsify: the fxopt.csr_linear op against the dense product, the pass against an independently pruned model,
N:M masks, match counts, what it must leave alone, option errors and artifacts. Real data: test_sparsify_real.py.
"""
import copy
import gzip
from unittest import mock

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import fxopt
import fxopt.ir.ops
from fxopt.backends.artifact import artifact_file, load_artifact, save_artifact
from fxopt.errors import PassError
from fxopt.passes.sparse import csr as csr_choice
from fxopt.passes.sparse.magnitude import nm_mask, nonzeros_per_group
from tests.harness import TOLERANCE, ModelCase, assert_equivalent, count, examples, relative_error, token_model_cases

aten = torch.ops.aten
CSR = torch.ops.fxopt.csr_linear.default
LINEAR = aten.linear.default


def sparsify(graph, spec: str):
    return fxopt.Pipeline(spec, debug=True)(graph)


def stats_of(result) -> dict:
    return result.stats["0:sparsify"]


def reference_keep(magnitudes: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Independent of the pass: a stable sort, the round(sparsity * n) smallest (first ones on ties) go."""
    flat = magnitudes.reshape(-1)
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[torch.sort(flat, stable=True).indices[:round(sparsity * flat.numel())]] = False
    return keep.reshape(magnitudes.shape)


def pruned_model(model: nn.Module, sparsity: float, scope: str) -> nn.Module:
    """A copy of ``model`` with every nn.Linear weight magnitude-pruned by :func:`reference_keep`."""
    pruned = copy.deepcopy(model)
    linears = [m for m in pruned.modules() if isinstance(m, nn.Linear)]
    if not linears:
        return pruned
    with torch.no_grad():
        if scope == "global":
            keep = reference_keep(torch.cat([m.weight.float().abs().reshape(-1) for m in linears]), sparsity)
            for m, part in zip(linears, torch.split(keep, [m.weight.numel() for m in linears])):
                m.weight.mul_(part.reshape(m.weight.shape))
        else:
            for m in linears:
                m.weight.mul_(reference_keep(m.weight.float().abs(), sparsity))
    return pruned


# ------------------------------------------------------------------- the op
@st.composite
def csr_cases(draw):
    out_features, in_features = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    leading = draw(st.sampled_from([(), (1,), (3,), (2, 5), (0,)]))
    density = draw(st.sampled_from([0.0, 1.0, 0.05, 0.3, 0.7]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    weight = torch.randn(out_features, in_features, generator=gen)
    weight = (weight * (torch.rand(weight.shape, generator=gen) < density)).to(dtype)
    bias = torch.randn(out_features, generator=gen).to(dtype) if draw(st.booleans()) else None
    x = torch.randn(*leading, in_features, generator=gen).to(dtype)
    return weight, bias, x, draw(st.sampled_from([torch.int32, torch.int64]))


@examples(40)
@given(case=csr_cases(), mv_from=st.sampled_from([0, 10**9]))
def test_csr_linear_equals_the_dense_linear(case, mv_from):
    weight, bias, x, index_dtype = case
    csr = weight.to_sparse_csr()
    crow, col = csr.crow_indices().to(index_dtype), csr.col_indices().to(index_dtype)
    with mock.patch.object(fxopt.ir.ops, "CSR_MV_MIN_NONZEROS", mv_from):  # one row: addmv, or addmm
        got = torch.ops.fxopt.csr_linear(x, crow, col, csr.values(), *weight.shape, bias)
    expected = F.linear(x, weight, bias)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert relative_error(expected, got) <= TOLERANCE[x.dtype]


def test_csr_linear_rejects_arrays_that_do_not_fit():
    weight = torch.randn(4, 6)
    crow, col, values = csr_choice.to_csr(weight)
    with pytest.raises(ValueError, match=r"crow_indices has shape \[5\], expected \[4\]"):
        torch.ops.fxopt.csr_linear(torch.randn(2, 6), crow, col, values, 3, 6, None)
    with pytest.raises(ValueError, match=r"input's last dim is 5, in_features is 6"):
        torch.ops.fxopt.csr_linear(torch.randn(2, 5), crow, col, values, 4, 6, None)


class _CsrModule(nn.Module):
    def __init__(self, weight, bias):
        super().__init__()
        crow, col, values = csr_choice.to_csr(weight)
        for name, t in (("crow", crow), ("col", col), ("values", values), ("bias", bias)):
            self.register_buffer(name, t)
        self.shape = tuple(weight.shape)

    def forward(self, x):
        return torch.relu(torch.ops.fxopt.csr_linear(x, self.crow, self.col, self.values, *self.shape, self.bias))


def test_a_graph_with_csr_linear_captures_and_re_exports_through_the_fake_kernel():
    weight = torch.randn(6, 8) * (torch.rand(6, 8) < 0.3)
    module, x = _CsrModule(weight, torch.randn(6)), torch.randn(2, 3, 8)
    graph = fxopt.capture(module, (x,))
    assert count(graph, CSR) == 1
    program = torch.export.export(graph.module, (x,), strict=False)
    assert any(n.target == CSR for n in program.graph.nodes)
    assert_equivalent(module, program.module(), (x,))


# ------------------------------------------------------------ the pass
def float_token_cases():
    return token_model_cases(dtypes=(torch.float32, torch.float64))


@examples(10)
@given(case=float_token_cases(), sparsity=st.sampled_from([0.0, 0.5, 0.9, 0.99]),
       scope=st.sampled_from(["layer", "global"]), fmt=st.sampled_from(["auto", "csr", "dense"]))
def test_sparsify_equals_the_independently_pruned_model(case: ModelCase, sparsity, scope, fmt):
    graph = fxopt.capture(case.model, case.inputs)
    linears = count(graph, LINEAR)
    result = sparsify(graph, f"sparsify{{sparsity={sparsity},scope={scope},format={fmt}}}")
    assert_equivalent(pruned_model(case.model, sparsity, scope), result.graph, case.inputs)
    stats, out = stats_of(result), result.graph
    assert stats["layers"] == linears and stats["csr"] == count(out, CSR)
    assert count(out, CSR) + count(out, LINEAR) == linears
    if fmt == "csr":
        assert count(out, CSR) == linears
    if fmt == "dense" or sparsity == 0.0 and fmt == "auto":
        assert count(out, CSR) == 0


def test_per_layer_sparsity_is_exact_and_global_differs_by_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 20))
    with torch.no_grad():
        model[2].weight.mul_(10)  # a layer of larger weights: the global threshold spares it
    graph = fxopt.capture(model, (torch.randn(4, 40),))
    layer = sparsify(graph, "sparsify{sparsity=0.7,format=dense}").graph
    zeros = [int((layer.param(n.args[1]) == 0).sum()) for n in layer.call_nodes(LINEAR)]
    assert zeros == [round(0.7 * 1200), round(0.7 * 600)]
    glob = sparsify(graph, "sparsify{sparsity=0.7,scope=global,format=dense}")
    weights = [glob.graph.param(n.args[1]) for n in glob.graph.call_nodes(LINEAR)]
    assert sum(int((w == 0).sum()) for w in weights) == round(0.7 * 1800)
    assert float((weights[1] == 0).float().mean()) < 0.2 < 0.9 < float((weights[0] == 0).float().mean())
    assert stats_of(glob)["sparsity"] == round(0.7 * 1800) / 1800


@pytest.mark.parametrize("rows, density_limit", [(1, "CSR_MAX_DENSITY_ONE_ROW"), (8, "CSR_MAX_DENSITY_MANY_ROWS")])
def test_auto_format_follows_the_measured_crossover_for_the_row_count(monkeypatch, rows, density_limit):
    monkeypatch.setattr(csr_choice, "CSR_MAX_DENSITY_ONE_ROW", 0.4)
    monkeypatch.setattr(csr_choice, "CSR_MAX_DENSITY_MANY_ROWS", 0.2)
    limit = getattr(csr_choice, density_limit)
    graph = fxopt.capture(nn.Linear(50, 20), (torch.randn(rows, 50),))
    just_below = sparsify(graph, f"sparsify{{sparsity={1 - limit + 0.02}}}").graph
    just_above = sparsify(graph, f"sparsify{{sparsity={1 - limit - 0.02}}}").graph
    assert (count(just_below, CSR), count(just_above, CSR)) == (1, 0)
    assert count(just_above, LINEAR) == 1


# ------------------------------------------------------------------ N:M
@examples(30)
@given(rows=st.integers(1, 6), groups=st.integers(1, 6), nm=st.sampled_from([(2, 4), (1, 4), (4, 8), (1, 2), (3, 8)]),
       seed=st.integers(0, 2**16))
def test_nm_mask_keeps_the_n_largest_of_every_group(rows, groups, nm, seed):
    n, m = nm
    weight = torch.randn(rows, groups * m, generator=torch.Generator().manual_seed(seed))
    kept = weight * nm_mask(weight, n, m)
    assert (nonzeros_per_group(kept, m) == n).all()
    magnitudes = weight.abs().reshape(rows, groups, m)
    keep = (kept != 0).reshape(rows, groups, m)
    smallest_kept = magnitudes.masked_fill(~keep, float("inf")).min(-1).values
    largest_dropped = magnitudes.masked_fill(keep, -1.0).max(-1).values
    assert (smallest_kept >= largest_dropped).all()


def test_2_4_pattern_prunes_divisible_linears_and_skips_the_others():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 5))
    x = torch.randn(3, 16)
    graph = fxopt.capture(model, (x,))
    result = sparsify(graph, "sparsify{pattern=2:4}")
    assert stats_of(result) == {"pattern": "2:4", "layers": 2, "csr": 0, "dense": 2, "skipped": 1, "sparsity": 0.5}
    weights = [result.graph.param(n.args[1]) for n in result.graph.call_nodes(LINEAR)]
    assert (nonzeros_per_group(weights[0], 4) <= 2).all() and (nonzeros_per_group(weights[1], 4) <= 2).all()
    assert torch.equal(weights[2], model[4].weight.detach())  # 6 inputs: not a multiple of 4, left alone
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for layer in (reference[0], reference[2]):
            layer.weight.mul_(nm_mask(layer.weight, 2, 4))
    assert_equivalent(reference, result.graph, (x,))


# ------------------------------------------------------- must not match
class _NotLinears(nn.Module):
    """An embedding, a convolution and a product of two activations: weights sparsify must not touch."""

    def __init__(self):
        super().__init__()
        self.embed, self.conv = nn.Embedding(10, 8), nn.Conv1d(8, 8, 3, padding=1)

    def forward(self, ids):
        h = self.conv(self.embed(ids).transpose(1, 2)).transpose(1, 2)
        return h @ h.transpose(1, 2)


def test_embeddings_convolutions_and_activation_products_are_left_alone():
    graph = fxopt.capture(_NotLinears(), (torch.randint(0, 10, (2, 5)),))
    result = sparsify(graph, "sparsify{sparsity=0.9,format=csr}")
    assert not result.modified and stats_of(result)["layers"] == 0
    assert result.graph.format() == graph.format()


def test_fused_linear_act_is_pruned_but_stays_dense_and_fused():
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU())
    graph = fxopt.Pipeline("fuse-epilogue")(fxopt.capture(model, (torch.randn(4, 16),))).graph
    fused = torch.ops.fxopt.linear_act.default
    assert count(graph, fused) == 1
    result = sparsify(graph, "sparsify{sparsity=0.9,format=csr}")
    assert (count(result.graph, fused), count(result.graph, CSR)) == (1, 0)
    weight = result.graph.param(next(result.graph.call_nodes(fused)).args[1])
    assert int((weight == 0).sum()) == round(0.9 * 128)


# ------------------------------------------------------------ bad options
@pytest.mark.parametrize("spec, message", [
    ("sparsify{sparsity=1.0}", r"sparsify: option sparsity=1.0 is outside \[0, 1\); give the fraction"),
    ("sparsify{sparsity=-0.1}", r"sparsify: option sparsity=-0.1 is outside \[0, 1\)"),
    ("sparsify{pattern=2-4}", r"sparsify: option pattern=2-4 is not of the form N:M; write pattern=unstructured"),
    ("sparsify{pattern=5:4}", r"sparsify: option pattern=5:4 must keep N of every M weights with 0 < N < M"),
    ("sparsify{pattern=0:4}", r"sparsify: option pattern=0:4 must keep N of every M weights with 0 < N < M"),
    ("sparsify{pattern=2:4,sparsity=0.5}", r"sparsify: option sparsity=0.5 does not apply to pattern=2:4; .*drop"),
    ("sparsify{pattern=2:4,format=csr}", r"sparsify: option format=csr does not apply to pattern=2:4"),
    ("sparsify{format=coo}", r"sparsify: option format='coo' is not one of auto, csr, dense"),
])
def test_bad_options_raise_naming_the_option(spec, message):
    with pytest.raises(PassError, match=message):
        fxopt.Pipeline(spec)


# --------------------------------------------------------------- artifacts
def test_csr_artifact_round_trips_and_its_weights_file_shrinks(tmp_path):
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)), torch.randn(4, 256)
    graph = fxopt.capture(model, (x,))
    as_csr = sparsify(graph, "sparsify{sparsity=0.9,format=csr}").graph
    as_dense = sparsify(graph, "sparsify{sparsity=0.9,format=dense}").graph
    sizes = {}
    for name, g in (("original", graph), ("csr", as_csr), ("dense", as_dense)):
        save_artifact(g, tmp_path / name, target="eager")
        sizes[name] = artifact_file(tmp_path / name, "weights.safetensors").stat().st_size
    loaded, _ = load_artifact(tmp_path / "csr")
    assert count(loaded, CSR) == 2 and torch.equal(loaded.run(x), as_csr.run(x))
    # CSR stores 4 + 4 bytes per nonzero (float32 value, int32 column) and 4 per row; dense stores 4 per weight.
    nonzeros, rows, biases = round(0.1 * 2 * 256 * 512), 512 + 256 + 2, 4 * (512 + 256)
    assert abs(sizes["csr"] - (8 * nonzeros + 4 * rows + biases)) < 2048  # the safetensors JSON header
    assert sizes["csr"] < 0.21 * sizes["original"]
    # Dense with zeros is no smaller on disk (safetensors does not compress); gzip sees the zeros.
    assert abs(sizes["dense"] - sizes["original"]) < 2048
    zipped = len(gzip.compress(artifact_file(tmp_path / "dense", "weights.safetensors").read_bytes()))
    assert zipped < 0.3 * sizes["dense"]
