"""The optional parts of swav: which extra of ``pip install 'swav[EXTRA]'`` brings which module, and
the one error that says what to install.

The core install (``pip install swav``) runs every command; a part that needs an optional library
asks for it with :func:`require` (one module, imported) or :func:`require_extra` (every module of
an extra, checked before any work starts). Either raises :class:`MissingExtraError`, a
``ModuleNotFoundError`` whose message is one line ending in the ``pip install`` to run; ``swav``
exits 2 with that line (``swav.commands.exit_status``, which also maps a plain
``ModuleNotFoundError`` of a module listed here). ``pyproject.toml`` declares the same extras
(``tests/test_extras.py`` checks that they agree and that every module the package imports is
declared).
"""
from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

__all__ = ["OPTIONAL_MODULES", "MissingExtraError", "install_hint", "is_installed", "require", "require_extra",
           "missing_extra_message"]

#: top-level module -> (the distribution that installs it, the extra that brings it)
OPTIONAL_MODULES: dict[str, tuple[str, str]] = {
    "matplotlib": ("matplotlib", "report"),
    "sklearn": ("scikit-learn", "report"),
    "threadpoolctl": ("threadpoolctl", "report"),
    "tensorboard": ("tensorboard", "tensorboard"),
    "timm": ("timm", "timm"),  # backbones named timm/<name> (swav.models.library)
    "torchvision": ("torchvision", "torchvision"),  # backbones named torchvision/<name>
    "onnx": ("onnx", "onnx"),  # swav export --format onnx
    "onnxscript": ("onnxscript", "onnx"),
    "onnxruntime": ("onnxruntime", "onnx"),  # to run the exported graphs (the tests check with it)
}


def install_hint(extra: str) -> str:
    """``pip install 'swav[EXTRA]'``"""
    return f"pip install 'swav[{extra}]'"


class MissingExtraError(ModuleNotFoundError):
    """An optional library is not installed; the message says what needs it and what to install."""

    def __init__(self, purpose: str, modules: list[str]):
        extras = sorted({OPTIONAL_MODULES[m][1] for m in modules})
        dists = [OPTIONAL_MODULES[m][0] for m in modules]
        names = " and ".join(dists) if len(dists) <= 2 else ", ".join(dists[:-1]) + " and " + dists[-1]
        verb = "is" if len(dists) == 1 else "are"
        super().__init__(f"{purpose} needs {names}, which {verb} not installed: "
                         + " and ".join(install_hint(e) for e in extras), name=modules[0])
        self.modules, self.extras = list(modules), extras


def _top(name: str | None) -> str:
    return (name or "").partition(".")[0]


def is_installed(module: str) -> bool:
    """Whether ``module`` can be imported (found without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent missing, or an entry of None in sys.modules
        return False


def require(module: str, purpose: str) -> ModuleType:
    """``import module`` (a module of :data:`OPTIONAL_MODULES`, or one of its submodules), or
    :class:`MissingExtraError` naming ``purpose`` and the extra to install."""
    top = _top(module)
    if top not in OPTIONAL_MODULES:
        raise KeyError(f"{top!r} is not an optional module of swav (see swav.extras.OPTIONAL_MODULES)")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if _top(e.name) != top:  # something the optional library itself needs: not ours to hide
            raise
        raise MissingExtraError(purpose, [top]) from None


def require_extra(extra: str, purpose: str) -> None:
    """Check that every module of ``extra`` is installed, before any work; else
    :class:`MissingExtraError` naming all that are missing."""
    modules = [m for m, (_, e) in OPTIONAL_MODULES.items() if e == extra]
    if not modules:
        raise KeyError(f"no extra {extra!r} (see swav.extras.OPTIONAL_MODULES)")
    missing = [m for m in modules if not is_installed(m)]
    if missing:
        raise MissingExtraError(purpose, missing)


def missing_extra_message(exc: BaseException) -> str | None:
    """The one-line message for an optional module that is missing (``MissingExtraError``, or a
    ``ModuleNotFoundError`` of a module of :data:`OPTIONAL_MODULES`); None for anything else."""
    if isinstance(exc, MissingExtraError):
        return str(exc)
    if isinstance(exc, ModuleNotFoundError) and _top(exc.name) in OPTIONAL_MODULES:
        return str(MissingExtraError("this command", [_top(exc.name)]))
    return None
