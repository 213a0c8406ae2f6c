"""The ``fxopt`` command line.

    fxopt optimize MODULE:FACTORY --target x86-int8 [--preset P | --passes SPEC] [--tolerance T] --out DIR
    fxopt search-bundle MODULE:FACTORY --target cuda --tolerance T --out BUNDLE   # build the candidates here
    fxopt pick BUNDLE [--tolerance T] --out DIR                                    # measure, choose, save there
    fxopt run DIR --inputs inputs.safetensors [--outputs outputs.safetensors]
    fxopt passes
    fxopt report DIR [--html report.html]

``MODULE:FACTORY`` names a function (importable from the current directory)
that returns ``(model, example_inputs)``, or ``(model, example_inputs,
calibration_data)`` where calibration data is a list of input tuples. ``run``
reads the inputs from a safetensors file, by the graph's input names (or
``input_0``, ``input_1``, ... in order), and writes the output tensors to one.
``search-bundle`` and ``pick`` are ``optimize --tolerance`` in two steps, for
a target whose candidates run on another machine than the one that builds
them (``cuda`` built without a GPU): ``fxopt.search_bundle`` and ``fxopt.pick``.
``report`` prints a short summary of a saved artifact's report and, with
``--html``, writes the full report page (fxopt.report.html).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
from typing import List, Optional, Sequence

import torch

from fxopt.errors import FxoptError, InputError


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except FxoptError as exc:
        print(f"fxopt {args.command}: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    from fxopt.targets import registered_targets
    targets = registered_targets()
    presets = sorted({name for cls in targets.values() for name in cls.presets})
    parser = argparse.ArgumentParser(prog="fxopt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    opt = commands.add_parser("optimize", help="optimize a model and save the artifact")
    _model_arguments(opt, targets, presets, target_required=False)
    opt.add_argument("--tolerance", type=_tolerance,
                     help="search the candidates and keep the fastest within it: cosine=0.99, max_rel_err=0.01, "
                          "or a number (max relative error)")
    opt.add_argument("--out", required=True, help="artifact directory (replaced atomically)")
    opt.set_defaults(handler=_optimize)
    bundle = commands.add_parser("search-bundle", help="build every search candidate into a bundle directory, to "
                                                       "measure and choose on another machine with `fxopt pick`")
    _model_arguments(bundle, targets, presets, target_required=True)
    bundle.add_argument("--tolerance", type=_tolerance, required=True,
                        help="the tolerance pick chooses with unless it is given another: cosine=0.999, "
                             "max_rel_err=0.01, or a number (max relative error)")
    bundle.add_argument("--out", required=True, help="bundle directory (replaced atomically)")
    bundle.set_defaults(handler=_search_bundle)
    pick = commands.add_parser("pick", help="measure a bundle's candidates here, save the fastest within the "
                                            "tolerance as an artifact")
    pick.add_argument("bundle")
    pick.add_argument("--tolerance", type=_tolerance, help="default: the bundle's")
    pick.add_argument("--out", required=True, help="artifact directory for the chosen candidate")
    pick.add_argument("--allow-torch-mismatch", action="store_true",
                      help="accept a bundle built under another torch major.minor (as fxopt.load does)")
    pick.set_defaults(handler=_pick)
    run = commands.add_parser("run", help="run a saved artifact on inputs from a safetensors file")
    run.add_argument("artifact")
    run.add_argument("--inputs", required=True)
    run.add_argument("--outputs", help="safetensors file for the outputs (default: print their shapes only)")
    run.set_defaults(handler=_run)
    passes = commands.add_parser("passes", help="list the registered passes, their options and the presets")
    passes.set_defaults(handler=_passes)
    report = commands.add_parser("report", help="summarize a saved artifact's report; --html writes the full page")
    report.add_argument("artifact")
    report.add_argument("--html", help="write a self-contained HTML report (plots, graphs, per-pass stats) here")
    report.set_defaults(handler=_report)
    return parser


def _optimize(args) -> int:
    import fxopt
    made = _call_factory(args.factory)
    model, example = made[0], tuple(made[1])
    calibration = made[2] if len(made) > 2 else None
    optimized = fxopt.optimize(model, example, target=args.target, preset=args.preset, passes=args.passes,
                               calibration_data=calibration, tolerance=args.tolerance)
    path = optimized.save(args.out)
    report = optimized.report()
    print(f"saved {path} (target {args.target}): {report['params']:,} weights, "
          f"{report['size_bytes'] / 1e6:.2f} MB (was {report['original_size_bytes'] / 1e6:.2f} MB); "
          f"pipeline {optimized.pipeline}")
    return 0


def _search_bundle(args) -> int:
    import fxopt
    made = _call_factory(args.factory)
    path = fxopt.search_bundle(made[0], tuple(made[1]), args.out, target=args.target, tolerance=args.tolerance,
                               calibration_data=made[2] if len(made) > 2 else None, preset=args.preset,
                               passes=args.passes)
    print(f"saved search bundle {path} (target {args.target}); measure and choose where the model will run: "
          f"fxopt pick {path} --out ARTIFACT")
    return 0


def _pick(args) -> int:
    import fxopt
    chosen = fxopt.pick(args.bundle, tolerance=args.tolerance, out=args.out,
                        allow_torch_mismatch=args.allow_torch_mismatch)
    search = chosen.report()["search"]
    print(f"saved {os.path.abspath(args.out)}: {search['chosen']} ({search['tolerance']}), "
          f"{search['latency_ms']:.4g} ms; pipeline {chosen.pipeline}")
    return 0


def _model_arguments(parser, targets, presets, target_required: bool) -> None:
    """The model factory, target, preset and passes: what optimize and search-bundle both take."""
    parser.add_argument("factory", metavar="MODULE:FACTORY")
    parser.add_argument("--target", choices=list(targets), **({"required": True} if target_required
                                                              else {"default": "eager"}))
    parser.add_argument("--preset", choices=presets,
                        help="the target's preset (each target lists its own: fxopt passes)")
    parser.add_argument("--passes", help="a pipeline spec, e.g. 'cleanup,fuse-epilogue'")


def _tolerance(text: str):
    """``cosine=0.99`` -> {"cosine": 0.99}; a bare number is a max relative error."""
    key, sep, value = text.partition("=")
    try:
        return {key.strip(): float(value)} if sep else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not cosine=C, max_rel_err=E or a number") from None


def _call_factory(spec: str):
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise InputError(f"factory {spec!r} is not MODULE:FACTORY (e.g. mymodels:make_bert)")
    sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"factory {spec!r} cannot be loaded: {exc}; check the module is importable from "
                         f"{os.getcwd()} and defines {attr}") from exc
    made = factory()
    if not (isinstance(made, (tuple, list)) and len(made) in (2, 3) and isinstance(made[0], torch.nn.Module)):
        raise InputError(f"factory {spec!r} must return (model, example_inputs) or "
                         f"(model, example_inputs, calibration_data); it returned {type(made).__name__}")
    return made


def _run(args) -> int:
    import fxopt
    from safetensors.torch import load_file, save_file
    loaded = fxopt.load(args.artifact)
    tensors = load_file(args.inputs)
    inputs = _ordered_inputs(loaded.graph, tensors, args.inputs)
    outputs = _flat_outputs(loaded(*inputs))
    for name, value in outputs.items():
        print(f"{name}: {str(value.dtype).replace('torch.', '')}{list(value.shape)}")
    if args.outputs:
        save_file({k: v.contiguous() for k, v in outputs.items()}, args.outputs)
    return 0


def _ordered_inputs(graph, tensors: dict, path: str) -> List[torch.Tensor]:
    names = [spec.name for spec in graph.input_specs]
    for i, name in enumerate(names):
        if name not in tensors and f"input_{i}" in tensors:
            tensors[name] = tensors[f"input_{i}"]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise InputError(f"{path}: no tensor named {', '.join(missing)}; the artifact takes "
                         f"{', '.join(f'{s.name} {s.describe()}' for s in graph.input_specs)} "
                         f"(or name them input_0, input_1, ...)")
    return [tensors[n].clone() for n in names]  # clone: safetensors hands back unaligned memory


def _flat_outputs(output) -> dict:
    from torch.utils._pytree import tree_flatten_with_path, keystr
    leaves, _ = tree_flatten_with_path(output)
    return {keystr(path).strip("[]'.") or "output": value for path, value in leaves if torch.is_tensor(value)}


def _passes(args) -> int:
    from fxopt.passes import registered_passes, registered_presets
    from fxopt.passes.infra.base import option_fields
    for name, cls in registered_passes().items():
        options = ", ".join(f"{f.name.replace('_', '-')}={f.default!r}" for f in option_fields(cls)
                            if f.default is not dataclasses.MISSING)
        print(f"{name:32s} {getattr(cls, 'summary', '')}")
        if options:
            print(f"{'':32s}   options: {options}")
        if cls.takes_calibration():
            print(f"{'':32s}   calibration data, where an option needs it: Pipeline(spec, calibration=batches)")
    print("\npresets:")
    for name, spec in registered_presets().items():
        print(f"  {name:30s} {spec}")
    from fxopt.targets import registered_targets
    print("\ntargets (optimize --target T --preset P):")
    for name, cls in registered_targets().items():
        print(f"  {name}")
        for preset, meaning in cls.presets.items():
            default = " (default)" if preset == cls.default_preset else ""
            print(f"    {preset + default:28s} {meaning.passes}: {meaning.description}")
    return 0


def _report(args) -> int:
    from fxopt.backends.artifact import load_artifact
    from fxopt.report.html import write_html
    from fxopt.report.summary import text_summary
    graph, manifest = load_artifact(args.artifact)  # checks the manifest and every file's checksum
    extra = manifest.get("extra") or {}
    report = dict(extra.get("report") or {})
    report.setdefault("target", manifest.get("target"))
    report.setdefault("pipeline", extra.get("pipeline"))
    ops = sum(1 for n in graph.nodes if n.op == "call_function")
    print(f"artifact {args.artifact}\n" + text_summary(report, graph_ops=ops))
    if args.html:
        print(f"wrote {write_html(report, args.html, graph_after=graph)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
