import os
import random
import warnings

import pytest
from hypothesis import HealthCheck, settings

# The verifier runs after every pass in tests.
os.environ.setdefault("FXOPT_DEBUG", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# x86-int8 runs on its eager oneDNN kernels unless a test asks for the TorchInductor path: compiling every
# lowered model would add ~5-50 s per optimize on CI's 2 cores. tests/backends/test_x86_int8_inductor.py covers
# the compiled path, and its test_the_default_path_end_to_end_... runs what users get by default (auto: compile,
# time both, keep the faster, load it back) with this variable removed.
os.environ.setdefault("FXOPT_X86_COMPILE", "never")

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", derandomize=True, max_examples=25, print_blob=True, **_common)
settings.register_profile("dev", max_examples=10, **_common)
settings.register_profile("slow", max_examples=500, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)

#: The pipeline fuzz (tests/test_fuzz_pipelines.py) draws new cases each run from this seed, printed in the
#: header; FXOPT_FUZZ_SEED=N replays a run.
FUZZ_SEED = int(os.environ.get("FXOPT_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
os.environ["FXOPT_FUZZ_SEED"] = str(FUZZ_SEED)  # pytest-xdist's workers inherit it: one seed per run

# `make test` runs two pytest-xdist workers on CI's 2 cores (most of the suite is single-threaded Python:
# capture, hypothesis, passes); each worker gets one torch thread so the two do not fight over the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(1)


def pytest_report_header(config):
    return f"fxopt fuzz seed: {FUZZ_SEED} (replay with FXOPT_FUZZ_SEED={FUZZ_SEED})"


def pytest_terminal_summary(terminalreporter):  # also under -q, which hides the header
    terminalreporter.write_line(pytest_report_header(None))


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
