"""Python bindings of system libraries that Debian builds for its own ``python3`` and PyPI
does not carry: libnbd's (``python3-libnbd``) and libseccomp's (``python3-seccomp``).

The project's Python may be another build of CPython 3.11 (a venv made by pyenv, say) that does
not see Debian's dist-packages. The binding is then loaded from there by hand, module by module
(same CPython 3.11 ABI); the directory is never added to ``sys.path``, where it would put every
Debian Python package ahead of the venv's.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

DEBIAN_DIST_PACKAGES = "/usr/lib/python3/dist-packages"


def load(
    names: Sequence[str], *, package: str, is_it: Callable[[ModuleType], bool] = lambda _: True
) -> ModuleType:
    """The module ``names[-1]``: imported as usual when it is on the path (and ``is_it``
    accepts it: PyPI may have an unrelated module of the same name), otherwise ``names`` are
    loaded in order from Debian's dist-packages. ImportError naming the Debian ``package``."""
    with contextlib.suppress(ImportError):
        module = importlib.import_module(names[-1])
        if is_it(module):
            return module
        sys.modules.pop(names[-1], None)
    for name in names:
        if name in sys.modules:
            continue
        spec = importlib.machinery.PathFinder.find_spec(name, [DEBIAN_DIST_PACKAGES])
        if spec is None or spec.loader is None:
            raise ImportError(
                f"{name} is not installed for Python {sys.version_info.major}."
                f"{sys.version_info.minor}: install Debian's {package} (scripts/host-deps)"
            )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise ImportError(f"cannot load {name} from Debian's {package}: {exc}") from None
    return sys.modules[names[-1]]
