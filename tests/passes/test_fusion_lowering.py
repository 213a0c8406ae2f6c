"""What the fusion passes create lowers through the TVM CUDA backend: Relax import of fused tiny BERT, GPT-2,
ViT, the conv/BN ResNet and fused norms, checked against eager on TVM's CPU target, and CUDA codegen for sm_90."""
from __future__ import annotations

import pytest
import torch
from torch.utils import _pytree as pytree

tvm = pytest.importorskip("tvm")

import fxopt  # noqa: E402
from fxopt.backends import tvm_cuda  # noqa: E402
from tests import models  # noqa: E402
from tests.harness import relative_error  # noqa: E402
from tests.passes.fusion_models import DecomposedNorm  # noqa: E402

TOL = 1e-5


def run_on_cpu(mod, inputs):
    """Build the Relax module for TVM's llvm target and run ``main``."""
    from tvm import relax

    vm = relax.VirtualMachine(tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(x.numpy()) for x in inputs])
    outs = [out] if hasattr(out, "numpy") else [out[i] for i in range(len(out))]
    return [torch.from_numpy(o.numpy()) for o in outs]


def fused(model, inputs):
    return fxopt.Pipeline("fuse")(fxopt.capture(model, inputs)).graph


class Norms(torch.nn.Module):
    """A decomposed LayerNorm, then a decomposed RMSNorm."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer_norm = DecomposedNorm(8, "layer-norm", "var", "div", "weight+bias", (-1,), 1e-5, False)
        self.rms_norm = DecomposedNorm(8, "rms-norm", "pow", "rsqrt", "left-weight", (-1,), 1e-6, False)

    def forward(self, x):
        return self.rms_norm(self.layer_norm(x)[0])[0]


@pytest.mark.parametrize("build, created", [
    (models.tiny_bert, ["scaled_dot_product_attention", "linear_act", "split_with_sizes"]),
    (models.tiny_gpt2, ["scaled_dot_product_attention", "linear_act"]),
    (models.tiny_vit, ["scaled_dot_product_attention", "linear_act", "split_with_sizes"]),
    (models.conv_bn_resnet, ["conv_act"]),
])
def test_fused_models_import_to_relax_and_match_eager(build, created):
    model, inputs = build()
    graph = fused(model, inputs)
    targets = {str(n.target) for n in graph.call_nodes()}
    assert all(any(name in t for t in targets) for name in created), targets
    expected = [t for t in pytree.tree_leaves(graph.run(*inputs)) if isinstance(t, torch.Tensor)]
    got = run_on_cpu(tvm_cuda.to_relax(graph), inputs)
    assert len(got) == len(expected)
    for e, g in zip(expected, got):
        assert relative_error(e, g) <= TOL


def test_fused_norms_import_to_relax_and_match_eager():
    inputs = (torch.randn(2, 3, 8),)
    graph = fused(Norms().eval(), inputs)
    names = [str(n.target) for n in graph.call_nodes()]
    assert "aten.layer_norm.default" in names and "aten.rms_norm.default" in names
    (got,) = run_on_cpu(tvm_cuda.to_relax(graph), inputs)
    assert relative_error(graph.run(*inputs), got) <= TOL


def test_fused_gpt2_generates_cuda_kernels_for_sm_90():
    model, inputs = models.tiny_gpt2()
    library = tvm_cuda.build(fused(model, inputs), dtype="float16", arch="sm_90", compile_kernels=False)
    assert library.cuda_source.count("__global__") >= 20 and "half* __restrict__" in library.cuda_source


class Conv1dNet(torch.nn.Module):
    """Conv1d + BN + SiLU and a Conv3d + ReLU: fused to conv_act of rank 1 and 3."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.bn = torch.nn.Conv1d(3, 4, 3, padding=1), torch.nn.BatchNorm1d(4)
        self.c3 = torch.nn.Conv3d(2, 3, 3, stride=2)

    def forward(self, x, v):
        return torch.nn.functional.silu(self.bn(self.c1(x))), torch.relu(self.c3(v))


def test_fused_1d_and_3d_convolutions_lower():
    inputs = (torch.randn(2, 3, 10), torch.randn(1, 2, 5, 6, 7))
    graph = fused(Conv1dNet().eval(), inputs)
    assert sum(1 for n in graph.call_nodes() if "conv_act" in str(n.target)) == 2
    expected = graph.run(*inputs)
    got = run_on_cpu(tvm_cuda.to_relax(graph), inputs)
    for e, g in zip(expected, got):
        assert relative_error(e, g) <= TOL
