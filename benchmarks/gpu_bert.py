"""BERT-base (and GPT-2 small, ViT-base) on the GPU: fxopt ``cuda`` (TVM) against torch eager and torch.compile.

Two steps, on two machines (issue 4's measurement harness):

    # here, on the CPU machine (TVM compiler + nvcc): capture, cleanup, build fp16 for sm_90, export
    .venv/bin/python benchmarks/gpu_bert.py --build build/gpu_bert [--models bert,gpt2,vit]

    # on the GPU machine (torch, triton; TVM runtime only, from .tvm/):
    source .tvm/setup.sh && python3 benchmarks/gpu_bert.py --run build/gpu_bert --out $OUT

``--build`` writes, per model, ``<model>.so`` (kernels as a fatbin, *no* weights)
and ``<model>.params.json`` (the weights the library takes, by ``state_dict``
key, in order, with a crc32 each), plus ``build.json`` (compile times, options).
``--run`` builds the same torch model again (weights are a function of their
names, ``benchmarks/common.py``), takes fp32 eager as the reference, and times
in one process, with ``triton.testing.do_bench(return_mode="median")`` after a
warm-up: torch eager fp32 and fp16, torch.compile default and
``mode="reduce-overhead"`` (fp16), and fxopt cuda fp16 (the TVM VM loaded from
the ``.so``, weights fed from the torch model's ``state_dict``). It reports the
relative error of each fp16 system against fp32 eager, the library's load
time, and where the TVM version's GPU time goes (kernels by CUPTI through
``torch.profiler``). Results go to ``--out`` as JSON and markdown.

``--target llvm`` and ``--device cpu`` are the dry run of both steps on a CPU
machine (``--models bert-tiny``): the same code paths, no GPU.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repo root: fxopt and benchmarks.common

from benchmarks.common import MODELS, bert_tiny, git_rev, relative_error  # noqa: E402

SHAPES = {"bert": "batch 8 x seq 128", "gpt2": "batch 8 x seq 128", "llama": "batch 8 x seq 128",
          "vit": "batch 8 x 3x224x224",
          "bert-tiny": "batch 2 x seq 16"}


ALL_MODELS: Dict[str, Callable] = {**MODELS, "bert-tiny": bert_tiny}


def first_tensor(out) -> torch.Tensor:
    """``last_hidden_state``: the first tensor of a HF output, a tuple or a tensor."""
    if torch.is_tensor(out):
        return out
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    if isinstance(out, dict):
        return next(iter(out.values()))
    return first_tensor(out[0])



# ===================================================================== build
def build(out_dir: str, models: List[str], cleanup: bool, target: str, arch: str, cuda_graph: bool,
          no_cuda_graph_too: List[str], variants: List[str] = (), base: bool = True) -> dict:
    """Build each model's library (``<name>.so``); for the models in ``no_cuda_graph_too`` also ``<name>-nocg.so``."""
    import tvm

    os.makedirs(out_dir, exist_ok=True)
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
            "cpu_count": os.cpu_count(), "git": git_rev(), "torch": torch.__version__, "tvm": tvm.__version__,
            "target": target, "arch": arch, "cuda_graph": cuda_graph, "cleanup": cleanup, "dtype": "float16",
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "models": {}}
    for name in models:
        print(f"[build] {name}: {SHAPES.get(name, '')}", flush=True)
        entry = build_one(out_dir, name, name, cleanup, target, arch, cuda_graph) if base else {}
        entry["extra_libraries"] = []
        if cuda_graph and name in no_cuda_graph_too:
            extra = build_one(out_dir, name, f"{name}-nocg", cleanup, target, arch, False)
            entry["extra_libraries"].append({"label": "no CUDA graphs", **extra})
        for variant in variants:  # "<pipeline spec>+<matmul rule>", e.g. "fuse+mma", "cleanup,fuse-attention+cublaslt"
            passes, matmul = variant.split("+")
            stem = f"{name}-{passes.replace(',', '-')}-{matmul}"
            extra = build_one(out_dir, name, stem, cleanup, target, arch, cuda_graph, passes=passes, matmul=matmul)
            entry["extra_libraries"].append({"label": f"{passes}, matmul={matmul}, CUDA graphs", **extra})
        meta["models"][name] = entry
        with open(os.path.join(out_dir, "build.json"), "w") as f:
            json.dump(meta, f, indent=1)
    return meta


def build_one(out_dir: str, name: str, stem: str, cleanup: bool, target: str, arch: str, cuda_graph: bool,
              passes: str = "cleanup", matmul: str = "default") -> dict:
    """fxopt.capture -> cleanup -> tvm_cuda.build (weights as inputs) -> export; each step timed."""
    import fxopt
    from fxopt.backends import tvm_cuda

    times = {}
    model, inputs = ALL_MODELS[name]()
    start = t = time.perf_counter()
    graph = fxopt.capture(model, inputs)
    times["capture_s"], t = time.perf_counter() - t, time.perf_counter()
    if cleanup:
        graph = fxopt.Pipeline(passes)(graph).graph
    times["cleanup_s"], t = time.perf_counter() - t, time.perf_counter()
    path = os.path.join(out_dir, f"{stem}.so")
    if target == "cuda":
        lib = tvm_cuda.build(graph, dtype="float16", arch=arch, cuda_graph=cuda_graph, keep_params_as_input=True,
                             matmul=matmul)
        kernels = lib.cuda_source.count("__global__")
    else:  # llvm: the dry run of the whole flow on a CPU machine
        lib, kernels = _build_llvm(graph), None
    times["tvm_build_s"], t = time.perf_counter() - t, time.perf_counter()
    lib.export(path)
    times["export_s"] = time.perf_counter() - t
    times["total_s"] = time.perf_counter() - start
    state = model.state_dict()
    stale = [p.name for p in lib.params if p.name not in state]
    if stale:
        raise SystemExit(f"[build] {name}: weights {stale[:3]} are not in the model's state_dict; the --run "
                         "step could not feed them")
    entry = {**{k: round(v, 2) for k, v in times.items()}, "library": os.path.basename(path),
             "cuda_graph": cuda_graph, "library_bytes": os.path.getsize(path), "params": len(lib.params),
             "param_bytes_fp32": sum(int(torch.Size(p.shape).numel()) * 4 for p in lib.params),
             "cuda_kernels": kernels, "graph_nodes": len(graph), "inputs": lib.input_names}
    print(f"[build] {stem}: {json.dumps(entry)}", flush=True)
    return entry


def _build_llvm(graph):
    import tvm

    from fxopt.backends import tvm_cuda
    from fxopt.backends.tvm_cuda.runtime import tensor_crc32

    mod, weights = tvm_cuda.prepare(graph, "float16", keep_params_as_input=True)
    executable = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
    params = [tvm_cuda.ParamSpec(n, tuple(t.shape), str(t.dtype).replace("torch.", ""), tensor_crc32(t))
              for n, t in weights]
    return tvm_cuda.CudaLibrary(executable, None, "", None, [s.name for s in graph.input_specs], params)


# ======================================================================= run
class Bench:
    """Timing, results and the deadline of one ``--run``."""

    def __init__(self, device: str, out_dir: str, deadline_s: float, warmup_ms: int, rep_ms: int):
        self.device, self.out_dir = device, out_dir
        self.start = time.perf_counter()
        self.deadline_s, self.warmup_ms, self.rep_ms = deadline_s, warmup_ms, rep_ms
        self.results: dict = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def time_ms(self, fn: Callable) -> float:
        if self.device == "cuda":
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median"))
        for _ in range(3):
            fn()
        samples = []
        for _ in range(10):
            t = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t) * 1e3)
        return sorted(samples)[len(samples) // 2]

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def save(self) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, "gpu_bert.json"), "w") as f:
            json.dump(self.results, f, indent=1)
        with open(os.path.join(self.out_dir, "gpu_bert.md"), "w") as f:
            f.write(markdown(self.results))


def run(lib_dir: str, out_dir: str, device: str, models: Optional[List[str]], systems: List[str],
        deadline_s: float, profile: bool, warmup_ms: int, rep_ms: int, profile_all: bool = False) -> dict:
    build_meta = json.load(open(os.path.join(lib_dir, "build.json")))
    bench = Bench(device, out_dir, deadline_s, warmup_ms, rep_ms)
    bench.results = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "env": environment(device),
                     "build": build_meta, "command": " ".join(["python3"] + sys.argv), "models": {}}
    names = models or list(build_meta["models"])
    first_model_s = None
    for i, name in enumerate(names):
        if first_model_s is not None and bench.elapsed() + 1.1 * first_model_s > deadline_s:
            print(f"[run] {name}: skipped, {bench.elapsed():.0f} s of the {deadline_s:.0f} s deadline spent",
                  flush=True)
            bench.results["models"][name] = {"skipped": f"deadline ({bench.elapsed():.0f} s spent)"}
            continue
        started = bench.elapsed()
        try:
            run_model(bench, lib_dir, name, systems, profile and (i == 0 or profile_all))
        except Exception as exc:  # keep the other models' numbers
            import traceback

            traceback.print_exc()
            bench.results["models"].setdefault(name, {})["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        first_model_s = first_model_s or bench.elapsed() - started
        bench.save()
    print(markdown(bench.results), flush=True)
    return bench.results


def run_model(bench: Bench, lib_dir: str, name: str, systems: List[str], profile: bool) -> None:
    from fxopt.backends.tvm_cuda import runtime

    dev = torch.device(bench.device)
    result = bench.results["models"].setdefault(name, {"shape": SHAPES.get(name, ""), "systems": {}})
    rows = result["systems"]
    print(f"[run] {name}: building the torch model ({bench.elapsed():.0f} s)", flush=True)
    model, inputs = ALL_MODELS[name]()
    state = model.state_dict()  # fp32, CPU: what the library's weights were built from
    inputs = tuple(x.to(dev) for x in inputs)
    model32 = copy.deepcopy(model).to(dev)
    with torch.inference_mode():
        reference = first_tensor(model32(*inputs)).float().clone()
    bench.sync()

    def record(system: str, fn: Callable, out: torch.Tensor, extra: Optional[dict] = None,
               to_torch: Callable = first_tensor) -> None:
        row = {"rel_err": relative_error(reference, first_tensor(out).float()), **(extra or {})}
        row["latency_ms"] = bench.time_ms(fn)
        # once more after the timed calls: CUDA-graph replays (not only the capturing call) must be right too
        row["rel_err_after_timing"] = relative_error(reference, to_torch(fn()).float())
        rows[system] = row
        print(f"[run] {name}: {system}: {row['latency_ms']:.3f} ms, rel err {row['rel_err']:.2e} {extra or ''} "
              f"({bench.elapsed():.0f} s)", flush=True)
        bench.save()

    def guarded(key: str, system: str, body: Callable) -> None:
        """Run one system's measurement unless ``--systems`` leaves it out; its errors go into its row."""
        if key not in systems:
            return
        if bench.elapsed() > bench.deadline_s:
            rows[system] = {"skipped": f"deadline ({bench.elapsed():.0f} s spent)"}
            return
        try:
            body()
        except Exception as exc:
            import traceback

            traceback.print_exc()
            rows[system] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            bench.save()

    def eager32():
        with torch.inference_mode():
            record("torch eager fp32", lambda: model32(*inputs), model32(*inputs))

    guarded("eager32", "torch eager fp32", eager32)
    model16 = copy.deepcopy(model).to(dev).half()

    def eager16():
        with torch.inference_mode():
            record("torch eager fp16", lambda: model16(*inputs), model16(*inputs))

    guarded("eager16", "torch eager fp16", eager16)

    def compiled(mode: Optional[str], system: str):
        def body():
            torch._dynamo.reset()
            fn = torch.compile(copy.deepcopy(model16), **({"mode": mode} if mode else {}))
            with torch.inference_mode():
                t = time.perf_counter()
                for _ in range(3):  # reduce-overhead and max-autotune record their CUDA graphs on a later call
                    out = fn(*inputs)
                bench.sync()
                compile_s = time.perf_counter() - t
                out = first_tensor(out).clone()
                record(system, lambda: fn(*inputs), out, {"compile_s": round(compile_s, 1)})
                if profile and mode == "reduce-overhead" and bench.device == "cuda":
                    try:
                        result["torch_reduce_overhead_kernels"] = kernel_profile(lambda: fn(*inputs))
                    except Exception as exc:  # noqa: BLE001
                        result["torch_reduce_overhead_kernels"] = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
        return body

    guarded("compile", "torch.compile default fp16", compiled(None, "torch.compile default fp16"))
    guarded("reduce-overhead", "torch.compile reduce-overhead fp16",
            compiled("reduce-overhead", "torch.compile reduce-overhead fp16"))

    # ---- fxopt cuda: the TVM VM from the .so, weights from the state_dict by name (after the torch systems,
    # so that a crash inside TVM leaves their numbers saved)
    entry = bench.results["build"]["models"].get(name, {})
    libraries = [(entry["library"], "TVM" + (", CUDA graphs" if entry.get("cuda_graph") else ""),
                  "tvm_kernels")] if "library" in entry else []
    libraries += [(x["library"], f"TVM, {x['label']}", "tvm_kernels_" + x["library"].removesuffix(".so"))
                  for x in entry.get("extra_libraries", [])]
    for file_name, label, profile_key in sorted(libraries, key=lambda lib: "CUDA graphs" in lib[1]):
        precision = next((p for p in ("fp8", "int8") if f"quantize-{p}" in label), "fp16")
        system = f"fxopt cuda {precision} ({label})"

        def fxopt_cuda(file_name=file_name, system=system, profile_key=profile_key):
            path = os.path.join(lib_dir, file_name)
            t = time.perf_counter()
            lib = runtime.load(path, device=bench.device)
            load_s = time.perf_counter() - t
            bad = lib.crc_mismatches(state)
            if bad:
                print(f"[run] {name}: WARNING {len(bad)} weights differ from the build's (crc32), e.g. {bad[:3]}",
                      flush=True)
            t = time.perf_counter()
            lib.set_params(state, check_crc=False)
            params_s = time.perf_counter() - t
            tvm_inputs = lib.tvm_inputs(*inputs)
            t = time.perf_counter()
            out = lib.run_tvm(*tvm_inputs)
            lib.sync()
            first_s = time.perf_counter() - t
            record(system, lambda: lib.run_tvm(*tvm_inputs), first_tensor(lib.to_torch(out)),
                   to_torch=lambda o: first_tensor(lib.to_torch(o)), extra={
                       "load_s": round(load_s, 3), "set_params_s": round(params_s, 3),
                       "first_call_s": round(first_s, 3), "library_bytes": os.path.getsize(path),
                       "weights_crc_mismatch": len(bad)})
            if profile and bench.device == "cuda":
                try:
                    result[profile_key] = kernel_profile(lambda: lib.run_tvm(*tvm_inputs))
                    print(f"[run] {name}: {system}: kernels {json.dumps(result[profile_key]['by_category'])}",
                          flush=True)
                except Exception as exc:  # noqa: BLE001
                    result[profile_key] = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
                bench.save()

        guarded("fxopt", system, fxopt_cuda)

    # last: max-autotune's compile takes minutes, and a run cut short by its deadline keeps the rows above
    guarded("max-autotune", "torch.compile max-autotune fp16",
            compiled("max-autotune", "torch.compile max-autotune fp16"))


def kernel_profile(fn: Callable, iters: int = 20, top: int = 25) -> dict:
    """GPU kernels by total time per call, read by CUPTI through torch.profiler (CUDA-graph replays included)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    agg: Dict[str, List[float]] = {}
    for event in prof.events():
        if event.device_type != DeviceType.CUDA:
            continue
        entry = agg.setdefault(event.name, [0.0, 0])
        entry[0] += event.time_range.elapsed_us()
        entry[1] += 1
    kernels = sorted(({"name": k, "us_per_call": v[0] / iters, "launches_per_call": v[1] / iters}
                      for k, v in agg.items()), key=lambda r: -r["us_per_call"])
    total = sum(r["us_per_call"] for r in kernels)
    by_category: Dict[str, float] = {}
    for r in kernels:
        r["share"] = r["us_per_call"] / total if total else 0.0
        cat = kernel_category(r["name"])
        by_category[cat] = by_category.get(cat, 0.0) + r["us_per_call"]
    return {"iters": iters, "gpu_us_per_call": total, "kernels_per_call": sum(r["launches_per_call"] for r in kernels),
            "by_category": {k: round(v, 1) for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
            "top": kernels[:top]}


def kernel_category(name: str) -> str:
    n = name.lower()
    if "matmul" in n or "gemm" in n or "nvjet" in n or "cutlass" in n:
        return "matmul"
    if "softmax" in n:
        return "softmax"
    if "layer_norm" in n or "layernorm" in n:
        return "layer_norm"
    if "memcpy" in n or "memset" in n:
        return "memcpy/memset"
    if "take" in n or "embedding" in n or "gather" in n:
        return "gather"
    return "elementwise/other"


def environment(device: str) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "host": platform.node()}
    try:
        import tvm

        env["tvm"] = tvm.__version__
        env["tvm_runtime_only"] = os.environ.get("TVM_USE_RUNTIME_LIB") == "1"
    except Exception as exc:  # noqa: BLE001
        env["tvm"] = f"not importable: {exc}"
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, sm_count=props.multi_processor_count, cuda=torch.version.cuda,
                   gpu_memory_gib=round(props.total_memory / 2**30, 1))
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            pass
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True).stdout.strip()
        except OSError:
            pass
    return env


# ================================================================== markdown
def markdown(results: dict) -> str:
    env, build_meta = results.get("env", {}), results.get("build", {})
    lines = [f"# fxopt cuda (TVM) vs PyTorch: {', '.join(results.get('models', {}))}", "",
             f"- date: {results.get('date')}; device: {env.get('gpu', env.get('host'))} "
             f"(driver {env.get('driver', '?')}, CUDA {env.get('cuda', '?')}); torch {env.get('torch')}, "
             f"transformers {env.get('transformers')}, triton {env.get('triton', '-')}, TVM {env.get('tvm')} "
             f"(runtime only: {env.get('tvm_runtime_only')})",
             f"- run: `{results.get('command')}`",
             f"- build ({build_meta.get('date')}, {build_meta.get('cpu_count')} CPU cores, git {build_meta.get('git')},"
             f" TVM {build_meta.get('tvm')}, target {build_meta.get('target')} {build_meta.get('arch')}, CUDA graphs "
             f"{build_meta.get('cuda_graph')}, cleanup {build_meta.get('cleanup')}): `{build_meta.get('command')}`",
             "- latency: `triton.testing.do_bench(return_mode='median')` after a warm-up; rel err: "
             "||y - y_fp32|| / ||y_fp32|| on last_hidden_state against torch eager fp32", ""]
    for name, res in results.get("models", {}).items():
        lines += [f"## {name} ({res.get('shape', '')})", ""]
        if "skipped" in res or ("error" in res and not res.get("systems")):
            lines += [f"not measured: {res.get('skipped') or res.get('error')}", ""]
            continue
        b = build_meta.get("models", {}).get(name, {})
        if b:
            lines += [f"fxopt build (CPU machine): {b.get('total_s')} s in all (capture {b.get('capture_s')} s, "
                      f"cleanup {b.get('cleanup_s')} s, TVM build incl. nvcc {b.get('tvm_build_s')} s, export "
                      f"{b.get('export_s')} s); library {b.get('library_bytes', 0) / 1e6:.1f} MB without weights, "
                      f"{b.get('params')} weights passed at run time, {b.get('cuda_kernels')} CUDA kernels", ""]
        lines += ["| system | latency (ms) | vs fxopt | rel err vs fp32 | notes |", "|---|---:|---:|---:|---|"]
        rows = res.get("systems", {})
        ours = min((r["latency_ms"] for k, r in rows.items() if k.startswith("fxopt") and "latency_ms" in r),
                   default=None)
        for system, row in rows.items():
            if "latency_ms" not in row:
                lines.append(f"| {system} | - | - | - | {row.get('skipped') or row.get('error', '')[:200]} |")
                continue
            ratio = f"{ours / row['latency_ms']:.2f}x" if ours else "-"
            notes = ", ".join(f"{k} {v:.2e}" if k.startswith("rel_err") else f"{k} {v}" for k, v in row.items()
                              if k not in ("latency_ms", "rel_err"))
            lines.append(f"| {system} | {row['latency_ms']:.3f} | {ratio} | {row['rel_err']:.2e} | {notes} |")
        lines += ["", "(vs fxopt: the best fxopt latency / this system's latency; above 1 means fxopt is slower)", ""]
        for key, title in (("tvm_kernels", "fxopt cuda (TVM, CUDA graphs)"),
                           ("tvm_kernels_nocg", "fxopt cuda (TVM, no CUDA graphs)"),
                           ("torch_reduce_overhead_kernels", "torch.compile reduce-overhead")):
            lines += kernel_table(res.get(key), title)
    return "\n".join(lines) + "\n"


def kernel_table(prof: Optional[dict], title: str, top: int = 20) -> List[str]:
    if not prof:
        return []
    if "top" not in prof:
        return [f"kernel profile of {title} failed: {prof.get('error')}", ""]
    lines = [f"### Where {title}'s GPU time goes ({prof['iters']} calls under torch.profiler/CUPTI)", "",
             f"GPU kernel time {prof['gpu_us_per_call']:.0f} us per call, {prof['kernels_per_call']:.0f} kernels "
             "per call; by kind: " + ", ".join(f"{k} {v:.0f} us" for k, v in prof["by_category"].items()), "",
             "| kernel | us per call | launches per call | share |", "|---|---:|---:|---:|"]
    for k in prof["top"][:top]:
        lines.append(f"| `{k['name'][:90]}` | {k['us_per_call']:.1f} | {k['launches_per_call']:.0f} | "
                     f"{k['share'] * 100:.1f}% |")
    return lines + [""]


# ====================================================================== main
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--build", metavar="DIR", help="build the libraries into DIR (CPU machine, TVM compiler)")
    mode.add_argument("--run", metavar="DIR", help="time the libraries in DIR against PyTorch (GPU machine)")
    parser.add_argument("--models", default=None, help="comma-separated: bert, gpt2, vit, bert-tiny (default: "
                        "bert for --build, everything built for --run)")
    parser.add_argument("--no-cleanup", action="store_true", help="skip fxopt.Pipeline('cleanup') before lowering")
    parser.add_argument("--target", default="cuda", choices=["cuda", "llvm"], help="llvm: CPU dry run")
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--no-cuda-graph", action="store_true")
    parser.add_argument("--variants", default="", help="extra libraries, ';'-separated <pipeline spec>+<matmul>, "
                        "e.g. 'fuse+mma;cleanup,fuse-attention+cublaslt'")
    parser.add_argument("--no-base", action="store_true", help="build only the --variants libraries")
    parser.add_argument("--no-cuda-graph-too", default="bert", metavar="MODELS",
                        help="also build these models without CUDA graphs (<name>-nocg.so); '' for none")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: dry run of --run")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results/out"))
    parser.add_argument("--systems", default="fxopt,eager32,eager16,compile,reduce-overhead,max-autotune")
    parser.add_argument("--deadline", type=float, default=420.0, help="seconds; later work is skipped after it")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--profile-all", action="store_true", help="profile the kernels of every model, not the first")
    parser.add_argument("--warmup-ms", type=int, default=100)
    parser.add_argument("--rep-ms", type=int, default=500)
    args = parser.parse_args(argv)
    models = args.models.split(",") if args.models else None
    if args.build:
        build(args.build, models or ["bert"], not args.no_cleanup, args.target, args.arch, not args.no_cuda_graph,
              args.no_cuda_graph_too.split(",") if args.no_cuda_graph_too else [],
              [v for v in args.variants.split(";") if v], base=not args.no_base)
    else:
        run(args.run, args.out, args.device, models, args.systems.split(","), args.deadline, not args.no_profile,
            args.warmup_ms, args.rep_ms, args.profile_all)


if __name__ == "__main__":
    main()
