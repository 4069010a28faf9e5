"""Loads the compiled extension ``prefrank._C`` and reports a missing or stale build actionably.

Import never fails here (so the ``reference`` backend works without a build); an op that needs the
extension calls :func:`require`, which raises the ImportError recorded at import time. There is no silent
fallback to the reference implementation.
"""

import hashlib
from pathlib import Path

import torch  # noqa: F401  (loads libc10/libtorch, which prefrank._C links against)

REBUILD_HINT = (
    "build it from the source checkout with `make build` (or `pip install --no-build-isolation -e .`), "
    "or run with PREFRANK_BACKEND=reference to use the pure-PyTorch implementations"
)


def _source_hash(csrc):
    digest = hashlib.sha256()
    for path in sorted(csrc.iterdir()):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _load():
    try:
        from prefrank import _C
    except ImportError as err:
        return None, ImportError(f"prefrank's compiled extension prefrank._C could not be loaded ({err}); "
                                 f"{REBUILD_HINT}")
    csrc = Path(__file__).resolve().parent.parent / "csrc"
    if csrc.is_dir() and _source_hash(csrc) != _C.source_hash:
        return None, ImportError(f"prefrank._C is stale: the sources in {csrc} changed since it was built; "
                                 f"{REBUILD_HINT}")
    return _C, None


_C, _load_error = _load()


def require():
    """Raise the recorded ImportError if the extension is missing or stale."""
    if _load_error is not None:
        raise _load_error


def available():
    return _load_error is None


def has_cuda_kernels():
    return _C is not None and bool(_C.with_cuda)
