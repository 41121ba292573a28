"""The guest kernel: Debian's newest linux-image-*-cloud-amd64, downloaded and unpacked once.

The cache entry is keyed by package name and version (``kernel-<name>_<version>``), so an apt
update that brings a new kernel builds a new entry. Module dependencies come from the
``modules.dep`` that ``depmod -b`` writes for the unpacked tree (the .deb ships none).
"""

from __future__ import annotations

import gzip
import lzma
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rigs import RigError
from rigs.cache import build_lock
from rigs.host import run

META_PACKAGE = "linux-image-cloud-amd64"

# Modules the guest needs, in the order they must end up loaded (dependencies are added).
GUEST_MODULES = (
    "virtio_mmio",
    "virtio_blk",
    "ext4",
    "virtio_rng",
    "vmw_vsock_virtio_transport",
    "virtio_net",
)

_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def kconfig_value(config: Path, option: str) -> str | None:
    """``y``/``m``/the value of ``CONFIG_<option>`` in a Kconfig ``.config`` file, or None."""
    prefix = f"CONFIG_{option}="
    for line in config.read_text().splitlines():
        if line.startswith(prefix):
            return line[len(prefix) :]
    return None


@dataclass(frozen=True)
class Kernel:
    """An unpacked Debian kernel package in the cache."""

    package: str  # e.g. linux-image-6.1.0-56-cloud-amd64
    version: str  # the package version, e.g. 6.1.192-2
    release: str  # uname -r, e.g. 6.1.0-56-cloud-amd64
    root: Path  # the dpkg -x tree

    @property
    def key(self) -> str:
        """The cache key: package name and version."""
        return f"{self.package}_{self.version}"

    @property
    def vmlinuz(self) -> Path:
        """The bzImage to pass to ``-kernel``."""
        return self.root / "boot" / f"vmlinuz-{self.release}"

    @property
    def config(self) -> Path:
        """The kernel's build configuration."""
        return self.root / "boot" / f"config-{self.release}"

    @property
    def modules_dir(self) -> Path:
        """``lib/modules/<release>`` inside the unpacked tree."""
        return self.root / "lib" / "modules" / self.release

    def config_value(self, option: str) -> str | None:
        """Return ``y``/``m``/a value for ``CONFIG_<option>``, or None if not set."""
        return kconfig_value(self.config, option)

    def module_load_order(self, names: tuple[str, ...] = GUEST_MODULES) -> list[Path]:
        """Module files (relative to :attr:`modules_dir`) to insmod, dependencies first.

        Built-in modules are skipped; an unknown module name is an error.
        """
        deps = _read_modules_dep(self.modules_dir / "modules.dep")
        builtin = {
            _module_name(line)
            for line in (self.modules_dir / "modules.builtin").read_text().split()
        }
        by_name = {_module_name(path): path for path in deps}
        order: list[str] = []

        def visit(path: str) -> None:
            if path in order:
                return
            for dep in deps[path]:
                visit(dep)
            order.append(path)

        for name in names:
            key = name.replace("-", "_")
            if key in builtin:
                continue
            if key not in by_name:
                raise RigError(f"kernel {self.release} has no module {name!r}")
            visit(by_name[key])
        return [Path(p) for p in order]

    def module_bytes(self, relpath: Path) -> bytes:
        """A module's contents, decompressed (busybox insmod only takes plain .ko)."""
        path = self.modules_dir / relpath
        data = path.read_bytes()
        if path.name.endswith(".xz"):
            return lzma.decompress(data)
        if path.name.endswith(".gz"):
            return gzip.decompress(data)
        if path.name.endswith(".zst"):
            return run(["zstd", "-dc", str(path)])
        return data


def _module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for suffix in _MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def _read_modules_dep(path: Path) -> dict[str, list[str]]:
    deps: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if ":" in line:
            mod, _, rest = line.partition(":")
            deps[mod.strip()] = rest.split()
    return deps


def newest_cloud_kernel() -> tuple[str, str]:
    """The (package, version) that ``linux-image-cloud-amd64`` depends on, per apt's lists."""
    out = run(["apt-cache", "depends", META_PACKAGE]).decode()
    names = re.findall(r"Depends:\s*(linux-image-\S+-cloud-amd64)\s*$", out, re.MULTILINE)
    if not names:
        raise RigError(f"apt-cache depends {META_PACKAGE} names no kernel:\n{out}")
    package = names[0]
    show = run(["apt-cache", "show", "--no-all-versions", package]).decode()
    match = re.search(r"^Version:\s*(\S+)", show, re.MULTILINE)
    if not match:
        raise RigError(f"apt-cache show {package} gives no version")
    return package, match.group(1)


def ensure_kernel() -> Kernel:
    """Download and unpack the newest cloud kernel into the cache, unless it is there already."""
    package, version = newest_cloud_kernel()
    release = package.removeprefix("linux-image-")
    with build_lock() as root:
        kernel = Kernel(package, version, release, root / f"kernel-{package}_{version}")
        if (kernel.root / ".complete").exists():
            return kernel
        shutil.rmtree(kernel.root, ignore_errors=True)
        with tempfile.TemporaryDirectory(dir=root, prefix=".kernel-") as tmp:
            work = Path(tmp)
            run(["apt-get", "download", "-q", f"{package}={version}"], cwd=work)
            debs = list(work.glob("*.deb"))
            if len(debs) != 1:
                raise RigError(f"apt-get download {package} left {debs}")
            tree = work / "tree"
            run(["dpkg", "-x", str(debs[0]), str(tree)])
            # Keep only what the rig uses: the kernel, its config and the modules tree.
            shutil.rmtree(tree / "usr" / "share", ignore_errors=True)
            for extra in (tree / "boot").glob("System.map-*"):
                extra.unlink()
            modules = tree / "lib" / "modules" / release
            merged = tree / "usr" / "lib" / "modules" / release
            if not modules.is_dir() and merged.is_dir():  # a merged-/usr package
                modules.parent.mkdir(parents=True)
                merged.rename(modules)
            if not modules.is_dir():
                raise RigError(f"{debs[0].name} has no lib/modules/{release}")
            run(["depmod", "-b", str(tree), release])
            (tree / ".complete").write_text(f"{package} {version}\n")
            tree.rename(kernel.root)
        if not kernel.vmlinuz.is_file():
            raise RigError(f"{package} has no {kernel.vmlinuz.name}")
        return kernel
