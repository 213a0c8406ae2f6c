"""Rewrite passes. Importing this package registers every built-in pass."""
from fxopt.passes import cleanup  # noqa: F401  (registers the cleanup passes)
from fxopt.passes import fusion  # noqa: F401  (registers the fusion passes and the `fuse` preset)
from fxopt.passes import quantize  # noqa: F401  (registers insert-qdq)
from fxopt.passes import sparse  # noqa: F401  (registers sparsify)
from fxopt.passes import lowrank, share_params  # noqa: F401  (registers low-rank and share-params)
from fxopt.passes import prune  # noqa: F401  (registers prune-channels, prune-heads, prune-ffn)
from fxopt.passes.infra import *  # noqa: F401,F403
from fxopt.passes.infra import __all__ as _infra_all

__all__ = list(_infra_all)
