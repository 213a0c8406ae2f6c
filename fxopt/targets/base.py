"""What a target is: the one shape ``fxopt.optimize``, the search, ``save`` and ``load`` ask of every target.

A target is a class with a ``name``, its ``options`` (each with its valid values, the first the default), its
``presets`` (a pipeline spec and build settings each), and five steps:

- :meth:`Target.check_device`: raise :class:`~fxopt.errors.DeviceError` where the target cannot work here;
- :meth:`Target.build`: the graph to lower, from the pipeline's graph (quantization happens here, for example);
- :meth:`Target.candidates`: what the search may choose from (each built, not yet measured);
- :meth:`Target.lower`: a graph to a runner, on the kernel path it will use;
- :meth:`Target.load`: a saved graph (and the files :meth:`Target.files` saved with it) back to a runner.

Defaults make a new target short: one that only lowers differently from ``eager`` overrides ``lower`` and,
when its runner keeps files, ``files`` and ``load``. ``fxopt.register_target`` makes it known by name.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, Iterator, Mapping, Optional, Sequence, Tuple

from fxopt.errors import InputError
from fxopt.ir import Graph


@dataclass(frozen=True)
class OpenValues:
    """An option's values when they are not a short list: the ``named`` ones (the first is the default) and any
    other value ``accepts`` takes, which ``describe`` names for error messages (``"an int >= 0"``)."""

    named: Tuple[Any, ...]
    accepts: Callable[[Any], bool]
    describe: str

    def __contains__(self, value: Any) -> bool:
        return value in self.named or (not isinstance(value, bool) and self.accepts(value))

    def __getitem__(self, index: int) -> Any:
        return self.named[index]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.named)


@dataclass(frozen=True)
class Preset:
    """What a preset means for one target: the pass pipeline, and settings its build step reads."""

    passes: str
    description: str
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class BuildContext:
    """Everything a target's build and candidates may read: the graphs so far and the calibration data."""

    original: Graph  # the captured model
    fused: Graph  # the pipeline's result
    pipeline: str  # the pipeline's spec
    example_inputs: Tuple[Any, ...]
    calibration: Any  # fxopt.passes.infra.batches.Batches: streamed calibration data (the example inputs if none)
    preset: Preset
    progress: bool = True
    tolerance: Any = None  # fxopt.search.Tolerance while searching


@dataclass
class Build:
    """A graph ready to lower: its full pipeline spec, what building it did, and which target lowers it."""

    graph: Graph
    pipeline: str
    target: str
    stats: Dict[str, Any] = field(default_factory=dict)
    runner: Optional[Callable] = None  # already lowered (a search's winner, as it was timed)


class Target:
    """The base of every target; subclasses set ``name`` and ``presets`` and override what differs."""

    name: ClassVar[str] = ""
    #: option -> its valid values; the first is the default
    options: ClassVar[Dict[str, Tuple[Any, ...]]] = {}
    presets: ClassVar[Dict[str, Preset]] = {}
    default_preset: ClassVar[str] = "fast"
    #: whether build needs calibration data (optimize warns when it gets none)
    calibrates: ClassVar[bool] = False
    #: whether optimize compares each layer's output with the pipeline's graph (run here, in PyTorch)
    reports_layer_error: ClassVar[bool] = True
    #: the candidate the search's speedups are relative to; None: the original graph, timed in PyTorch beside them
    search_baseline: ClassVar[Optional[str]] = None
    #: interleaved rounds in which the search times its candidates (after two warm-up calls each)
    search_rounds: ClassVar[int] = 10

    def __init__(self, **options: Any):
        self.settings = self.validated(options)

    @classmethod
    def validated(cls, options: Mapping[str, Any]) -> Dict[str, Any]:
        """The options with defaults filled in; an unknown option or value raises an error listing the valid ones."""
        for key, value in options.items():
            if key not in cls.options:
                valid = ", ".join(cls.options) or "none"
                raise InputError(f"target {cls.name!r}: unknown option {key!r}; its options: {valid}")
            values = cls.options[key]
            if value not in values:
                more = f", or {values.describe}" if isinstance(values, OpenValues) else ""
                raise InputError(f"target {cls.name!r}: option {key}={value!r} is not valid; use one of "
                                 f"{', '.join(map(repr, values))}{more}")
        return {key: options.get(key, values[0]) for key, values in cls.options.items()}

    def preset(self, name: Optional[str]) -> Preset:
        name = name or self.default_preset
        if name not in self.presets:
            raise InputError(f"optimize: unknown preset {name!r} for target {self.name!r}; its presets: "
                             f"{', '.join(self.presets)} ({self.describe_presets()})")
        return self.presets[name]

    def describe_presets(self) -> str:
        return "; ".join(f"{name}: {preset.description}" for name, preset in self.presets.items())

    def check_device(self) -> None:
        """Raise DeviceError when this machine lacks what the target needs to build. Default: nothing needed."""

    def check_search(self, measure_here: bool = True) -> None:
        """Raise InputError when this target cannot search (``tolerance=``), or DeviceError when it cannot measure
        its candidates here and ``measure_here`` (``optimize``; a search bundle measures them elsewhere).
        Default: it can."""

    def check_dynamic_shapes(self) -> None:
        """Raise InputError when this target builds for static shapes only (``dynamic_shapes=``). Default: it
        builds for any size the captured ranges allow."""

    def timing_inputs(self, inputs: Sequence[Any]) -> Tuple[Any, ...]:
        """The example inputs as the search times the candidates on them (cuda: already on the GPU). Default: as
        they are."""
        return tuple(inputs)

    def runs_here(self) -> bool:
        """Whether the lowered model runs on this machine (optimize times it against the original only then)."""
        return True

    def device_description(self) -> str:
        """The device the lowered model runs on here, or why it cannot run here, for messages and the search's
        table (cuda: the GPU's name). Default: nothing to say."""
        return ""

    def build(self, context: BuildContext) -> Build:
        """The graph to lower. Default: the pipeline's graph as it is."""
        return Build(context.fused, context.pipeline, self.name)

    def candidates(self, context: BuildContext) -> Iterator:
        """What the search may choose (``fxopt.search.Candidate``, runners on the path they will use). Default:
        the float graph and its low-rank factorisations, lowered by this target."""
        from fxopt.targets.candidates import float_candidates
        yield from float_candidates(self, context)

    def lower(self, graph: Graph, example_inputs: Sequence[Any] = (), progress: bool = False,
              built_with: Optional[Dict[str, Any]] = None) -> Callable:
        """A callable running ``graph``; ``built_with`` is the lowering report of the build that saved it."""
        raise NotImplementedError(f"target {self.name!r} does not define lower()")

    def search_lower(self, graph: Graph) -> Callable:
        """The runner a search candidate is measured with, and returned with if it wins. Default: :meth:`lower`."""
        return self.lower(graph)

    def float_target(self) -> "Target":
        """The target that runs this target's float candidates (x86-int8's run in ``eager``). Default: itself."""
        return self

    def lowering_report(self, runner: Callable) -> Dict[str, Any]:
        """What lowering did, for ``report()["lowering"]``. Default: the runner's ``report`` if it has one."""
        report = getattr(runner, "report", None)
        return report.as_dict() if hasattr(report, "as_dict") else {}

    def files(self, runner: Callable) -> Optional[Dict[str, Any]]:
        """The backend files an artifact carries besides the graph (a compiled library). Default: the runner's."""
        return runner.files() if hasattr(runner, "files") else None

    def load(self, graph: Graph, directory: str, manifest: Dict[str, Any]) -> Callable:
        """The runner of a saved artifact (checksums already verified). Default: lower the graph again, on the
        kernel path its build measured (the manifest's lowering report)."""
        built_with = ((manifest.get("extra") or {}).get("report") or {}).get("lowering")
        return self.lower(graph, built_with=built_with)


def say(progress: bool, message: str) -> None:
    """One progress line on stderr, when ``progress`` is on."""
    if progress:
        print(message, file=sys.stderr, flush=True)
