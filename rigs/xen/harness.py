"""One Xen rig run as a test sees it: a dom0 script, domU scripts and the backend command.

The per-run files ride in a small archive appended to the cached dom0 base initramfs (Linux
unpacks concatenated archives in order): ``/test.sh`` (the dom0 script after
``. /etc/rigs/lib.sh``, see ``rigs/xen/sh/dom0-lib.sh``), ``/etc/rigs/backend`` (the backend
command), a copy of the pyvirtio package at ``/opt/pyvirtio/pyvirtio`` (``PYTHONPATH``), and
``/domu/initrd``: the domU base archive with ``/tests/<name>.sh`` appended the same way, and
any extra domU kernels at ``/domu/<name>`` (``domu_kernels``; the dom0 script picks one with
``domu_kernel NAME``, e.g. ``Image-grants`` from :mod:`rigs.xen.grant_kernel`).

Typical use::

    rig = ensure_rig()
    test = XenTest(dom0_script="backend_start\\ndomu_run d1 io 300 $(vdisk xvda /tmp/a.img)",
                   domu_scripts={"io": "dd if=/dev/vda of=/dev/null bs=1M count=1"})
    result = test.run(rig, workdir)
    assert result.results["d1.exit"] == "0"
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from rigs.initramfs import make_initramfs_with
from rigs.qemu import GuestResult
from rigs.xen.build import XenRig
from rigs.xen.bytecode import compile_sources
from rigs.xen.grant_kernel import GRANT_IMAGE_NAME, ensure_grant_kernel
from rigs.xen.initramfs import DOMU_DIR, PYVIRTIO_DIR
from rigs.xen.qemu import DEFAULT_TIMEOUT, DOM0_ARGS, XEN_ARGS, XenMachine

DEFAULT_BACKEND = "python3 -m pyvirtio xen -v"
DEFAULT_READY = "watching"  # a line of the backend's log that says it watches xenstore
PYVIRTIO_SRC = Path(__file__).resolve().parents[2] / "src" / "pyvirtio"
SCRIPT_HEADER = "#!/bin/sh\n. /etc/rigs/lib.sh\n"


def package_files(src: Path, prefix: str) -> dict[str, bytes]:
    """``prefix/<name>/...`` -> contents for a Python package tree, with bytecode compiled
    here (see :mod:`rigs.xen.bytecode`) instead of any __pycache__ of the host."""
    files: dict[str, bytes] = {}
    sources: list[tuple[str, Path]] = []
    for path in sorted(src.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            arc = f"{prefix}/{path.relative_to(src.parent).as_posix()}"
            files[arc] = path.read_bytes()
            if path.suffix == ".py":
                sources.append((arc, path))
    files.update(compile_sources(sources))
    return files


def _gzipped(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(2) == b"\x1f\x8b"


@dataclass
class XenTest:
    """What one boot runs.

    ``dom0_script`` is the body of dom0's /test.sh (busybox sh, dom0-lib.sh functions:
    backend_start, make_disk, vdisk, domu_run, ...); its exit status becomes ``@@EXIT``.
    ``domu_scripts`` maps a name to the body of /tests/<name>.sh in every domU
    (``domu_run NAME SCRIPT ...`` picks one). ``backend`` is the command ``backend_start``
    runs (None: none is set); ``backend_ready`` a log line it waits for ("" = 3 s).
    ``domu_kernels`` maps a file name to a host kernel Image put at ``/domu/<name>`` in dom0
    (``domu_kernel NAME`` in the dom0 script boots the domUs with it). ``domu_files`` are
    more files for the domUs' initramfs (archive path -> contents, e.g. kexec and a kernel).
    """

    dom0_script: str
    domu_scripts: Mapping[str, str] = field(default_factory=dict)
    backend: str | None = DEFAULT_BACKEND
    backend_ready: str = DEFAULT_READY
    pyvirtio_src: Path | None = PYVIRTIO_SRC
    timeout: float = DEFAULT_TIMEOUT
    quiet: bool = True  # dom0 kernel "quiet"
    xen_args: tuple[str, ...] = ()  # appended to the hypervisor's command line
    domu_kernels: Mapping[str, Path] = field(default_factory=dict)
    domu_files: Mapping[str, bytes] = field(default_factory=dict)

    def dom0_files(self, domu_initrd: Path) -> dict[str, bytes]:
        """The per-run archive for dom0 (path -> contents)."""
        files = {
            "test.sh": (SCRIPT_HEADER + self.dom0_script + "\n").encode(),
            "etc/rigs/backend-ready": self.backend_ready.encode(),
            f"{DOMU_DIR}/initrd": domu_initrd.read_bytes(),
        }
        for name, image in self.domu_kernels.items():
            if "/" in name or name in ("Image", "initrd"):
                raise ValueError(f"domU kernel name {name!r}: a plain name other than Image/initrd")
            files[f"{DOMU_DIR}/{name}"] = image.read_bytes()
        if self.backend is not None:
            files["etc/rigs/backend"] = self.backend.encode()
        if self.pyvirtio_src is not None:
            files.update(package_files(self.pyvirtio_src, PYVIRTIO_DIR))
        return files

    def prepare(self, rig: XenRig, workdir: Path) -> Path:
        """Write ``workdir/domu.cpio`` and ``workdir/dom0.cpio``; return the latter."""
        workdir.mkdir(parents=True, exist_ok=True)
        scripts = {"tests/main.sh": b"echo no domU script given\n"}
        for name, body in self.domu_scripts.items():
            scripts[f"tests/{name}.sh"] = (SCRIPT_HEADER + body + "\n").encode()
        # The kernel cannot read a plain archive after a gzip one: append like to like.
        domu = make_initramfs_with(
            rig.domu_initrd,
            {**self.domu_files, **scripts},
            workdir / "domu.cpio",
            compress=_gzipped(rig.domu_initrd),
        )
        return make_initramfs_with(
            rig.dom0_initrd,
            self.dom0_files(domu),
            workdir / "dom0.cpio",
            compress=_gzipped(rig.dom0_initrd),
        )

    def machine(self, rig: XenRig, workdir: Path) -> XenMachine:
        """A not yet started machine for this test."""
        initrd = self.prepare(rig, workdir)
        dom0_args = (*DOM0_ARGS, "quiet") if self.quiet else DOM0_ARGS
        return XenMachine(
            rig.hypervisor.image,
            rig.image,
            initrd,
            xen_args=(*XEN_ARGS, *self.xen_args),
            dom0_args=dom0_args,
            timeout=self.timeout,
            workdir=workdir,
        )

    def run(self, rig: XenRig, workdir: Path, *, check: bool = True) -> GuestResult:
        """Boot, run, and return dom0's results (GuestError/GuestTimeout on failure)."""
        with self.machine(rig, workdir) as machine:
            machine.start()
            return machine.wait(check=check)


def main(argv: list[str] | None = None) -> int:
    """``python -m rigs.xen.harness DOM0.sh [NAME=DOMU.sh ...]``: one boot, results printed."""
    import argparse
    import tempfile

    from rigs.xen.build import ensure_rig

    parser = argparse.ArgumentParser(prog="python -m rigs.xen.harness", description=main.__doc__)
    parser.add_argument("dom0", type=Path, help="dom0 script body (dom0-lib.sh is sourced first)")
    parser.add_argument("domu", nargs="*", help="NAME=FILE: /tests/NAME.sh in the domUs")
    parser.add_argument("--backend", default=DEFAULT_BACKEND, help="backend_start's command")
    parser.add_argument("--ready", default=DEFAULT_READY, help="backend log line to wait for")
    parser.add_argument("--workdir", type=Path, help="keep files here (default: a temp dir)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    parser.add_argument("--verbose", action="store_true", help="dom0 kernel without quiet")
    parser.add_argument(
        "--xen-arg", action="append", default=[], help="more of the hypervisor's command line"
    )
    parser.add_argument(
        "--grant-kernel",
        action="store_true",
        help=f"build rigs.xen.grant_kernel and put it at /domu/{GRANT_IMAGE_NAME}",
    )
    args = parser.parse_args(argv)
    kernels: dict[str, Path] = {}
    if args.grant_kernel:
        kernels[GRANT_IMAGE_NAME] = ensure_grant_kernel().image
    domu = {}
    for spec in args.domu:
        name, _, path = spec.partition("=")
        domu[name] = Path(path).read_text()
    test = XenTest(
        args.dom0.read_text(),
        domu,
        backend=args.backend,
        backend_ready=args.ready,
        timeout=args.timeout,
        quiet=not args.verbose,
        xen_args=tuple(args.xen_arg),
        domu_kernels=kernels,
    )
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="rigs-xen-"))
    result = test.run(ensure_rig(), workdir, check=False)
    for key, value in result.results.items():
        print(f"{key} = {value}")
    print(f"exit {result.exit_code}, {result.elapsed:.1f} s, console {result.console_path}")
    return 0 if result.exit_code == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
