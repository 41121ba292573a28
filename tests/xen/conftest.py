"""Fixtures for the Xen tests: the arm64 Xen rig (built once, cached) and a runner.

The backend command dom0 runs is ``PYVIRTIO_XEN_BACKEND`` (default
``python3 -m pyvirtio xen -v``, with ``PYTHONPATH`` at dom0's copy of src/pyvirtio); its
readiness line ``PYVIRTIO_XEN_BACKEND_READY`` (default ``watching``). A rig that cannot be
built fails the tests, never skips them. Each run keeps its console log in the test's
tmp_path (``xen/console.log``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
from rigs import RigError
from rigs.qemu import GuestResult
from rigs.xen.build import XenRig, ensure_rig
from rigs.xen.harness import DEFAULT_BACKEND, DEFAULT_READY, XenTest

BACKEND = os.environ.get("PYVIRTIO_XEN_BACKEND", DEFAULT_BACKEND)
BACKEND_READY = os.environ.get("PYVIRTIO_XEN_BACKEND_READY", DEFAULT_READY)

Runner = Callable[..., GuestResult]


@pytest.fixture(scope="session")
def xen_rig() -> XenRig:
    """Hypervisor, kernel and base archives (built on first use, then cached)."""
    try:
        return ensure_rig()
    except (RigError, OSError) as exc:
        pytest.fail(f"cannot build the Xen rig: {exc}", pytrace=False)


@pytest.fixture
def xen_run(xen_rig: XenRig, tmp_path: Path) -> Runner:
    """``xen_run(dom0_script, domu_scripts={...}, backend=..., check=True, domu_kernels=...,
    domu_files=..., xen_args=...)``: boot once."""

    def run(
        dom0_script: str,
        domu_scripts: dict[str, str] | None = None,
        *,
        backend: str | None = BACKEND,
        check: bool = True,
        timeout: float = 900.0,
        domu_kernels: Mapping[str, Path] | None = None,
        domu_files: Mapping[str, bytes] | None = None,
        xen_args: tuple[str, ...] = (),
    ) -> GuestResult:
        test = XenTest(
            dom0_script,
            domu_scripts or {},
            backend=backend,
            backend_ready=BACKEND_READY,
            timeout=timeout,
            domu_kernels=domu_kernels or {},
            domu_files=domu_files or {},
            xen_args=xen_args,
        )
        result = test.run(xen_rig, tmp_path / "xen", check=check)
        print(f"xen run: {result.elapsed:.1f} s wall, console {result.console_path}")
        return result

    return run
