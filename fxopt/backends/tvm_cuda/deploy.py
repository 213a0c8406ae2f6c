"""The ``cuda`` target of ``fxopt.optimize``: build once, run on a GPU, save and load as an artifact.

    optimized = fxopt.optimize(model, inputs, target="cuda")   # TVM build here, GPU or not
    optimized.save("bert-cuda")      # manifest, graph, weights + model.so, its params json, the cuBLASLt extension
    fxopt.load("bert-cuda")(*inputs) # on a GPU machine: no compiler, no model source

The build is the configuration measured fastest on the H100
(benchmarks/results/gpu_bert_norm_act.md): float16 compute, cuBLASLt GEMMs and
fxopt's attention / LayerNorm / GELU kernels, CUDA graphs, weights as inputs
(read from the artifact's ``weights.safetensors`` and transformed once on load).
Code generation needs nvcc but no GPU; running needs a GPU and raises
:class:`DeviceError` without one, naming what to do.

A graph with ops TVM cannot take (no converter after decomposition, or complex
tensors) is partitioned (:mod:`fxopt.backends.tvm_cuda.partition`): each
supported region is its own TVM build (``region_0.so``, ...), the other nodes
run in PyTorch between them (:class:`PartitionedCudaTarget`), and one
:class:`~fxopt.errors.PartitionWarning` names those ops and their counts. A
region whose build fails runs in PyTorch too, with the failure as its reason.
A graph TVM takes whole builds as before: one region, ``model.so``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from fxopt.backends.tvm_cuda import partition
from fxopt.errors import ArtifactError, DeviceError, InputError, LoweringError, PartitionWarning
from fxopt.ir.graph import Graph

TARGET = "cuda"
LIBRARY = "model.so"
#: What optimize(target="cuda") builds with (benchmarks/results/gpu_bert_norm_act.md: the fastest measured).
BUILD_OPTIONS = {"dtype": "float16", "arch": "sm_90", "cuda_graph": True, "keep_params_as_input": True,
                 "matmul": "cublaslt"}


class CudaTarget:
    """A built library, callable like the model once a GPU is there (loaded lazily, on the first call)."""

    #: one region, the whole graph; nothing runs in PyTorch
    plan: Optional[partition.Plan] = None

    def __init__(self, graph: Graph, library_dir: str, owns_dir: bool = True):
        self.graph = graph
        self.library_dir = library_dir
        self._owns_dir = owns_dir
        self._module = None

    @property
    def library_path(self) -> str:
        return os.path.join(self.library_dir, LIBRARY)

    def __call__(self, *inputs: torch.Tensor):
        self.graph.check_inputs(inputs)
        module = self._loaded()
        out = module(*inputs)
        leaves = list(out) if isinstance(out, tuple) else [out]
        return _as_model_output(self.graph, leaves)

    def _loaded(self):
        if self._module is None:
            require_gpu()
            self._module = _load_library(self.library_path, self.graph)
        return self._module

    def files(self) -> Dict[str, Path]:
        """The backend files an artifact carries: the library, its weight manifest and the extension(s). A runner
        loaded from an artifact reads them from its directory, whose own manifest, graph and weights are not
        among them (the new artifact writes its own)."""
        from fxopt.backends.artifact import RESERVED_FILES
        return {name: Path(self.library_dir) / name for name in sorted(os.listdir(self.library_dir))
                if name not in RESERVED_FILES}

    def __del__(self):
        if self._owns_dir:
            shutil.rmtree(self.library_dir, ignore_errors=True)


def _load_library(path: str, graph: Graph):
    """A TVM library under the runtime, given the weights it names (by state_dict key, crc-checked)."""
    from fxopt.backends.tvm_cuda.runtime import load
    module = load(path)
    module.set_params(graph.params(), check_crc=True)
    return module


def _as_model_output(graph: Graph, leaves: list):
    """The library's flat outputs in the structure the model returns (a dict, a tuple, one tensor)."""
    info = getattr(graph.fx_graph._codegen, "pytree_info", None)
    if info is not None and info.out_spec is not None:
        return pytree.tree_unflatten(leaves, info.out_spec)
    return leaves[0] if len(leaves) == 1 else tuple(leaves)


def require_gpu() -> None:
    if not torch.cuda.is_available():
        raise DeviceError("cuda: no CUDA device on this machine (torch.cuda.is_available() is False); the library "
                          "was built and can be saved with .save(dir): load it with fxopt.load(dir) on a machine "
                          "with an NVIDIA GPU (sm_90 by default), or optimize for target='x86-int8' or 'eager'")


class RegionLibrary(torch.nn.Module):
    """One region's TVM library inside the glue module: loaded on its first call, outputs in the graph's dtypes."""

    def __init__(self, library_path: str, graph: Graph, dtypes: List[torch.dtype]):
        super().__init__()
        self.library_path, self.graph, self.dtypes = library_path, graph, dtypes
        self._module = None

    def forward(self, *inputs: torch.Tensor):
        if self._module is None:
            self._module = _load_library(self.library_path, self.graph)
        out = self._module(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        return tuple(o.to(dtype) for o, dtype in zip(outs, self.dtypes))


class PartitionedCudaTarget(CudaTarget):
    """Regions run as TVM libraries; the nodes TVM cannot take run in PyTorch between them (the glue module)."""

    def __init__(self, graph: Graph, library_dir: str, plan: partition.Plan, glue: fx.GraphModule,
                 owns_dir: bool = True):
        super().__init__(graph, library_dir, owns_dir)
        self.plan = plan
        for region in plan.regions:
            path = os.path.join(library_dir, region.library)
            if not os.path.exists(path):
                raise ArtifactError(f"{library_dir}: {region.name} needs {region.library}, which is missing; "
                                    "copy the whole artifact directory, or save it again")
            setattr(glue, region.name, RegionLibrary(path, graph, partition.output_dtypes(glue, region)))
        self.glue = glue
        self._on_gpu = False

    def __call__(self, *inputs: torch.Tensor):
        self.graph.check_inputs(inputs)
        require_gpu()
        if not self._on_gpu:
            _to_device(self.glue, torch.device("cuda"))
            self._on_gpu = True
        with torch.no_grad():
            out = self.glue(*[x.to("cuda") for x in inputs])
        return _as_model_output(self.graph, list(out) if isinstance(out, (list, tuple)) else [out])


def _to_device(glue: fx.GraphModule, device: torch.device) -> None:
    """The fallback nodes' weights, and tensors they create (``device=`` arguments), on ``device``."""
    glue.to(device)
    for node in glue.graph.nodes:
        if node.op == "call_function" and isinstance(node.kwargs.get("device"), torch.device):
            node.update_kwarg("device", device)
    glue.recompile()


def build_target(graph: Graph, **options):
    """Build ``graph`` with :data:`BUILD_OPTIONS` (overridable) into a fresh directory.

    The whole graph is one library when TVM takes every node; otherwise the graph
    is partitioned, and one warning names the ops that run in PyTorch.
    """
    from fxopt.backends.tvm_cuda.lower import build, kept_whole_for
    from fxopt.backends.tvm_cuda.support import known_converters
    check_dtypes(graph)
    options = {**BUILD_OPTIONS, **options}
    known = known_converters(options.get("custom_convert_map"))
    plan = partition.propose(graph, known, kept_whole_for(options["dtype"], options["matmul"]))
    if not plan.fallback:
        library = build(graph, **options)
        directory = tempfile.mkdtemp(prefix="fxopt-cuda-")
        library.export(os.path.join(directory, LIBRARY))
        return CudaTarget(graph, directory)
    target = _build_partitioned(graph, plan, options)
    warnings.warn(target.plan.warning(), PartitionWarning, stacklevel=4)  # at the user's optimize() call
    return target


#: What the GPU path computes in: fxopt's CUDA kernels and TVM's tensor-core schedules are 16/32-bit.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_dtypes(graph: Graph) -> None:
    """Refuse float64 (and other non-GPU float) inputs and weights before TVM meets them."""
    named = [(f"input {s.name}", s.dtype) for s in graph.input_specs]
    named += [(f"weight {name}", t.dtype) for name, t in graph.params().items()]
    bad = [(what, dtype) for what, dtype in named if dtype.is_floating_point and dtype not in FLOAT_DTYPES]
    if bad:
        listed = ", ".join(f"{what} ({str(dtype).replace('torch.', '')})" for what, dtype in bad[:5])
        raise InputError(f"optimize(target='cuda'): the GPU path computes in float32/float16, and these are not: "
                         f"{listed}{' ...' if len(bad) > 5 else ''}; cast the model and inputs with .float() "
                         "(or use target='eager' to keep float64)")


def _build_partitioned(graph: Graph, plan: partition.Plan, options: dict) -> PartitionedCudaTarget:
    """Build every region (a region whose build fails joins the fallback) and export them with the plan."""
    from fxopt.backends.tvm_cuda.lower import build
    libraries: Dict[tuple, object] = {}
    glue = None
    while glue is None:
        glue, plan.regions = partition.split(graph, plan.partitions)
        for index, region in enumerate(plan.regions):
            if region.nodes in libraries:
                continue
            try:
                libraries[region.nodes] = build(partition.region_graph(glue, region), **options)
            except LoweringError as exc:
                reason = f"the TVM build of its region failed: {str(exc).splitlines()[0][:200]}"
                plan, glue = partition.without_partition(plan, graph, index, reason), None
                break
    directory = tempfile.mkdtemp(prefix="fxopt-cuda-")
    for region in plan.regions:
        libraries[region.nodes].export(os.path.join(directory, region.library))
    partition.write_plan(plan, directory)
    return PartitionedCudaTarget(graph, directory, plan, glue)


def load_target(graph: Graph, directory: str):
    """The runner of a saved ``cuda`` artifact (its files already verified by the artifact loader)."""
    plan_path = os.path.join(directory, partition.PARTITION_FILE)
    if os.path.exists(plan_path):
        _check_listed(directory, partition.PARTITION_FILE)
        plan = partition.read_plan(plan_path)
        glue = partition.glue_from_saved(graph, plan, plan_path)
        return PartitionedCudaTarget(graph, str(directory), plan, glue, owns_dir=False)
    if not os.path.exists(os.path.join(directory, LIBRARY)):
        raise ArtifactError(f"{directory}: a cuda artifact needs {LIBRARY}, which is missing; save it again")
    return CudaTarget(graph, str(directory), owns_dir=False)


def _check_listed(directory: str, name: str) -> None:
    """Only files the manifest lists were checksummed by the artifact loader: refuse one it does not list."""
    from fxopt.backends.artifact import MANIFEST
    with open(os.path.join(directory, MANIFEST)) as f:
        listed = json.load(f).get("files", {})
    if name not in listed:
        raise ArtifactError(f"{directory}: holds {name}, which its {MANIFEST} does not list (added after the save?); "
                            "copy or save the artifact again")


def build_summary(target) -> Dict[str, object]:
    """Library sizes and files, the build options, the number of TVM regions and the ops run in PyTorch."""
    plan = target.plan
    libraries = [r.library for r in plan.regions] if plan is not None else [LIBRARY]
    return {"library_bytes": sum(os.path.getsize(os.path.join(target.library_dir, name)) for name in libraries),
            "files": sorted(os.listdir(target.library_dir)), **{k: v for k, v in BUILD_OPTIONS.items()},
            "regions": len(plan.regions) if plan is not None else 1,
            "fallback_ops": plan.fallback_ops() if plan is not None else {},
            "fallback": [asdict(f) for f in plan.fallback] if plan is not None else []}
