"""Calls into fxopt's CUDA extension that must refuse bad operands, made in a fresh process.

In a subprocess because tests/backends/test_tvm_cuda_extension.py registers numpy stand-ins under the extension's
names in the test process, and TVM aborts a process whose functions are registered twice. ``calls`` names a
function (``"tests.backends.test_tvm_cuda_fp8:refusal_calls"``) returning ``{case: call}``; the result is
``{case: [exception type name, message]}`` (``["nothing", ""]`` where the call did not raise).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Dict, List

SCRIPT = """
import importlib, json, sys
import tvm_ffi  # noqa: F401  (loads libtvm_ffi.so, which the extension links against)
from fxopt.backends.tvm_cuda import extension
extension.load_extension(sys.argv[1])
module, function = sys.argv[2].split(":")
raised = {}
for case, call in getattr(importlib.import_module(module), function)().items():
    try:
        call()
        raised[case] = ["nothing", ""]
    except Exception as exc:
        raised[case] = [type(exc).__name__, str(exc)]
print(json.dumps(raised))
"""


def refusals(calls: str) -> Dict[str, List[str]]:
    from fxopt.backends.tvm_cuda import extension
    path = os.environ.get("FXOPT_CUDA_EXTENSION") or extension.extension_path()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", SCRIPT, path, calls], capture_output=True, text=True, cwd=root,
                          env={**os.environ, "PYTHONPATH": root}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
