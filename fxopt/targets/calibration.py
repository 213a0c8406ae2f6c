"""The calibration data optimize hands to a target: the user's batches, streamed, or the example inputs."""
from __future__ import annotations

import warnings
from typing import Optional

from fxopt.errors import InputError
from fxopt.passes.infra.batches import Batches

#: How many of the first calibration batches go to the passes that read data themselves (GPTQ, whitened low-rank).
PASS_CALIBRATION_BATCHES = 4


def calibration_batches(example_inputs, calibration_data, warn_for: Optional[str] = None) -> Batches:
    """``calibration_data`` as :class:`Batches` (streamed per pass, never held; a generator is spilled to disk),
    or the example inputs alone when it is None (with a warning naming ``warn_for``, a target that calibrates).
    Use it as a context manager: leaving it deletes a spill."""
    if calibration_data is None:
        if warn_for:
            warnings.warn(f"optimize(target={warn_for!r}): no calibration_data; calibrating on the example inputs "
                          "alone. Pass a few hundred representative samples (a list of input tuples) for accuracy",
                          stacklevel=4)
        return Batches([tuple(example_inputs)])
    batches = Batches(calibration_data)
    if batches.is_empty():
        batches.close()
        raise InputError("optimize: calibration_data is empty; pass a list of input tuples like example_inputs")
    return batches
