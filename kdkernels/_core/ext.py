"""Loading of the compiled extension ``kdkernels._C`` (optional: the package imports without it)."""

from __future__ import annotations

try:  # the extension links against torch: import torch first
    import torch  # noqa: F401

    from kdkernels import _C  # type: ignore[attr-defined]

    IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # built with KDK_NO_EXT=1, or not built at all (source checkout)
    _C = None
    IMPORT_ERROR = exc

HOW_TO_BUILD = (
    "reinstall from source with the extension: `pip install --no-build-isolation .` "
    "(needs a C++17 compiler and ninja; unset KDK_NO_EXT)"
)


def available() -> bool:
    return _C is not None


def require(what: str):
    """Return the extension module or raise a RuntimeError that says how to get it."""
    if _C is None:
        raise RuntimeError(f"{what} needs the compiled extension kdkernels._C, which is not importable "
                           f"({IMPORT_ERROR}); {HOW_TO_BUILD}")
    return _C


def build_info() -> dict:
    """What the installed build contains."""
    if _C is None:
        return {"extension": False, "error": str(IMPORT_ERROR)}
    return {"extension": True, "cpu_simd": _C.cpu_simd(), "cuda": bool(_C.built_with_cuda())}
