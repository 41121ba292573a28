"""The Xen 4.17 hypervisor, rebuilt from Debian's ``xen`` source package with the IOREQ server.

Debian's arm64 build has ``CONFIG_IOREQ_SERVER`` off (it needs ``CONFIG_EXPERT``), so the
hypervisor is cross-built from the orig tarball with Debian's own configuration
(``/boot/xen-4.17-arm64.config`` of ``xen-hypervisor-4.17-arm64``, same version) plus
``CONFIG_EXPERT=y`` and ``CONFIG_IOREQ_SERVER=y``, and with a built-in Flask policy
(``CONFIG_XSM_FLASK_POLICY=y``: Xen's example policy plus the rig's driver domain module, see
:mod:`rigs.xen.flask`; compiled by the host's ``checkpolicy``), which only a boot with
``xsm=flask`` uses. The result is cached under ``<cache>/xen/hypervisor/<version>-<hash>/xen``;
the hash covers the configuration, the policy module and the compiler's and checkpolicy's
versions.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rigs import RigError
from rigs.host import find_tool
from rigs.kernel import kconfig_value
from rigs.xen.apt import ForeignApt, newest_source
from rigs.xen.crossbuild import CROSS_COMPILE, compiler_version, run_logged
from rigs.xen.flask import MODULE, add_policy_module
from rigs.xen.packages import Packages

SOURCE_PACKAGE = "xen"
CONFIG_PACKAGE = "xen-hypervisor-4.17-arm64"
CONFIG_FILE = "boot/xen-4.17-arm64.config"
EXTRA_CONFIG = ("CONFIG_EXPERT=y", "CONFIG_IOREQ_SERVER=y", "CONFIG_XSM_FLASK_POLICY=y")
BUILD_FORMAT = 2  # bump to rebuild


@dataclass(frozen=True)
class Hypervisor:
    """A built hypervisor image (the ``-kernel`` of the QEMU machine) and its .config."""

    version: str  # the Debian source version it was built from
    image: Path
    config: Path

    def config_value(self, option: str) -> str | None:
        """``y``/value of ``CONFIG_<option>`` in the build configuration, or None."""
        return kconfig_value(self.config, option)


def source_version(apt: ForeignApt, into: Path) -> tuple[str, list[str], Path]:
    """The newest ``xen`` source version whose files can be had: (version, its binary
    package names, the orig tarball)."""
    return newest_source(apt, SOURCE_PACKAGE, into, "*.orig.tar.*")


def _make(args: list[str], cwd: Path, log: Path) -> None:
    base = ["make", "-C", "xen", "XEN_TARGET_ARCH=arm64", f"CROSS_COMPILE={CROSS_COMPILE}"]
    run_logged([*base, *args], cwd, log, f"make {' '.join(args)}")


def ensure_hypervisor(packages: Packages, version: str, orig: Path, into: Path) -> Hypervisor:
    """Build (once) the hypervisor of source ``version`` from ``orig`` into ``into``."""
    debian = packages.need(CONFIG_PACKAGE)
    base_config = debian.root / CONFIG_FILE
    if not base_config.is_file():
        raise RigError(f"{debian.key} has no /{CONFIG_FILE}")
    config_text = base_config.read_text() + "".join(f"{c}\n" for c in EXTRA_CONFIG)
    checkpolicy = subprocess.run(
        [str(find_tool("checkpolicy")), "-V"], capture_output=True, text=True
    ).stdout
    digest = hashlib.sha256(
        f"{BUILD_FORMAT}\n{debian.key}\n{config_text}\n{compiler_version()}\n{checkpolicy}\n"
        f"{MODULE.read_text()}".encode()
    ).hexdigest()[:12]
    out = into / f"{version}-{digest}"
    built = Hypervisor(version, out / "xen", out / "config")
    if built.image.is_file() and built.config.is_file():
        return built
    for tool in ("make", "flex", "bison", "m4", f"{CROSS_COMPILE}gcc", f"{CROSS_COMPILE}ld"):
        find_tool(tool)
    into.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=into, prefix=".build-") as tmp:
        work = Path(tmp)
        with tarfile.open(orig) as tar:
            tar.extractall(work, filter="data")
        tops = [p for p in work.iterdir() if p.is_dir()]
        if len(tops) != 1 or not (tops[0] / "xen" / "Makefile").is_file():
            raise RigError(f"{orig.name} does not unpack to one tree with xen/Makefile")
        src = tops[0]
        add_policy_module(src)
        (src / "xen" / ".config").write_text(config_text)
        log = work / "build.log"
        _make(["olddefconfig"], src, log)
        _make([f"-j{os.cpu_count() or 1}"], src, log)
        config = (src / "xen" / ".config").read_text()
        for wanted in EXTRA_CONFIG:
            if wanted not in config.splitlines():
                raise RigError(f"the built xen has no {wanted} after olddefconfig")
        stage = work / "out"
        stage.mkdir()
        shutil.copy2(src / "xen" / "xen", stage / "xen")
        (stage / "config").write_text(config)
        shutil.copy2(log, stage / "build.log")
        shutil.rmtree(out, ignore_errors=True)
        stage.rename(out)
        out.chmod(0o755)
    return built
