"""virtio-gpio and virtio-i2c on an unmodified Linux guest, with `pyvirtio gpio` and `pyvirtio
i2c`: the guest's stock libgpiod tools and i2c-tools (Debian's) see a GPIO chip and an I2C bus
through Linux's gpio-virtio and i2c-virtio drivers, and values cross both ways: what the guest
drives or writes, the host reads on the control socket; what the host sets there, the guest
reads.

No Debian amd64 kernel has the two drivers, so the guest runs a kernel built from Debian's
linux-source-6.1 for these tests (rigs/peripheral_kernel.py). QEMU 7.2's
vhost-user-gpio-device never offers VIRTIO_GPIO_F_IRQ to its guest, so GPIO interrupts are
tested in tests/unit/test_gpio.py only; the guest's feature bits are printed as evidence.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from rigs import RigError
from rigs.peripheral_kernel import ensure_peripheral_guest
from rigs.qemu import VhostUserDevice
from rigs.x86_guest import X86Guest

from pyvirtio.management.client import ControlClient, ControlClientError
from tests.e2e.conftest import GUEST_TIMEOUT
from tests.e2e.test_rng import _daemon

pytestmark = pytest.mark.e2e

# Every virtio device's id and feature bits, as the guest's driver negotiated them.
FEATURES = """
for d in /sys/bus/virtio/devices/*; do
    echo "@@RESULT features_$(cat $d/device) $(cat $d/features)"
done
"""

# Poll (up to 30 s) until a command prints what is expected.
UNTIL = """
until_prints() {
    want=$1; shift
    n=0
    while [ "$("$@" 2>/dev/null)" != "$want" ]; do
        n=$((n + 1))
        [ $n -gt 300 ] && { echo "@@RESULT timeout $*"; exit 20; }
        sleep 0.1
    done
}
"""

GPIO_SCRIPT = (
    FEATURES
    + UNTIL
    + """
echo "@@RESULT detect $(gpiodetect)"
echo "@@RESULT line0 $(gpioinfo gpiochip0 | grep 'line   0:' | tr -s ' \t' ' ')"
echo "@@RESULT line2 $(gpioinfo gpiochip0 | grep 'line   2:' | tr -s ' \t' ' ')"
gpioset --mode=signal gpiochip0 0=1 5=0 &
setter=$!
held() { gpioinfo gpiochip0 | grep 'line   0:' | grep -c 'output.*used'; }
until_prints 1 held
echo @@HELD
until_prints 1 gpioget gpiochip0 3
echo "@@RESULT in3 $(gpioget gpiochip0 3)"
echo "@@RESULT in6 $(gpioget gpiochip0 6)"
kill $setter
wait $setter
echo @@RELEASED
until_prints 1 gpioget gpiochip0 4
echo "@@RESULT in3_after $(gpioget gpiochip0 3)"
timeout 5 gpiomon --num-events=1 --rising-edge gpiochip0 7 </dev/null
echo "@@RESULT gpiomon_rc $?"
"""
)

I2C_SCRIPT = (
    FEATURES
    + UNTIL
    + """
echo "@@RESULT adapters $(i2cdetect -l | tr -s ' \t' ' ')"
echo "@@RESULT found $(i2cdetect -y 0 | sed -n 's/^[0-7]0: //p' | tr -s ' ' '\n' | grep -v -- -- | tr '\n' ' ')"
i2cset -y 0 0x50 0x10 0xab || exit 11
echo "@@RESULT eeprom10 $(i2cget -y 0 0x50 0x10)"
i2ctransfer -y 0 w5@0x50 0x20 0x01 0x02 0x03 0x04 || exit 12
echo "@@RESULT eeprom20 $(i2ctransfer -y 0 w1@0x50 0x20 r4)"
echo "@@RESULT dump10 $(i2cdump -y 0 0x50 b | grep '^10:' | cut -c1-30)"
echo "@@RESULT temp $(i2cget -y 0 0x48 0x00 w)"
i2cget -y 0 0x33 0x00 2>/dev/null && exit 13
echo @@WRITTEN
until_prints 0x5a i2cget -y 0 0x50 0x40
echo "@@RESULT eeprom40 $(i2cget -y 0 0x50 0x40)"
echo "@@RESULT temp_after $(i2cget -y 0 0x48 0x00 w)"
"""
)


@pytest.fixture(scope="module")
def peripheral_rig() -> X86Guest:
    """The kernel with gpio-virtio and i2c-virtio, and an initramfs with the tools."""
    try:
        return ensure_peripheral_guest()
    except (RigError, OSError) as exc:
        pytest.fail(f"cannot build the GPIO/I2C guest rig: {exc}", pytrace=False)


class Control:
    """A daemon's control socket, asked peripheral commands: "OK ..." or "ERR ..."."""

    def __init__(self, path: Path) -> None:
        self.client = ControlClient(str(path))

    def ask(self, line: str) -> str:
        try:
            reply: str = self.client.call("peripheral", command=line)["reply"]
        except ControlClientError as exc:
            return f"ERR {exc.desc}"
        return f"OK {reply}".rstrip()


@contextmanager
def _control(path: Path) -> Iterator[Control]:
    deadline = time.monotonic() + 10
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)
    control = Control(path)
    try:
        yield control
    finally:
        control.client.close()


def _features(results: dict[str, str], device_id: int) -> str:
    """The feature bits the guest's driver negotiated (sysfs: bit 0 first)."""
    return results[f"features_0x{device_id:04x}"]


def test_gpio_lines_both_ways(peripheral_rig: X86Guest, tmp_path: Path) -> None:
    sock, ctl = tmp_path / "gpio.sock", tmp_path / "gpio.ctl"
    args = ["gpio", "--socket-path", str(sock), "-l", "s8", "--control-socket", str(ctl)]
    args += ["--line-names", "led,,button"]
    with _daemon(args, tmp_path / "gpio.log") as daemon, _control(ctl) as control:
        control.ask("set 6 1")  # an input the host holds high before the guest starts
        guest = peripheral_rig.guest(
            GPIO_SCRIPT,
            [VhostUserDevice(sock, "vhost-user-gpio-device")],
            workdir=tmp_path / "guest",
            timeout=GUEST_TIMEOUT,
        )
        with guest:
            guest.start()
            guest.wait_for_console("@@HELD", GUEST_TIMEOUT)
            held = [control.ask(q) for q in ("get 0", "info 0", "get 5", "info 5")]
            assert control.ask("set 3 1") == "OK"
            guest.wait_for_console("@@RELEASED", GUEST_TIMEOUT)
            released = control.ask("info 0")
            assert control.ask("set 4 1") == "OK"
            result = guest.wait()
        assert daemon.poll() is None, "the daemon died"
    print(result.results, held, released, f"guest {result.elapsed:.1f}s")
    assert held == ["OK 1", "OK out 1 led", "OK 0", "OK out 0"]  # what the guest drives
    assert released == "OK none 0 led"  # gpioset exited: the line is released
    assert "gpiochip0" in result.results["detect"] and "(8 lines)" in result.results["detect"]
    assert '"led"' in result.results["line0"] and '"button"' in result.results["line2"]
    assert (result.results["in3"], result.results["in6"]) == ("1", "1")  # what the host drives
    assert result.results["in3_after"] == "1"
    # QEMU 7.2's vhost-user-gpio-device does not offer VIRTIO_GPIO_F_IRQ: no interrupt lines
    assert _features(result.results, 41)[:1] == "0"
    assert result.results["gpiomon_rc"] != "0"


def test_i2c_devices_both_ways(peripheral_rig: X86Guest, tmp_path: Path) -> None:
    sock, ctl = tmp_path / "i2c.sock", tmp_path / "i2c.ctl"
    args = [
        "i2c",
        "--socket-path",
        str(sock),
        "-l",
        "24c02:80,lm75:72",
        "--control-socket",
        str(ctl),
    ]
    with _daemon(args, tmp_path / "i2c.log") as daemon, _control(ctl) as control:
        guest = peripheral_rig.guest(
            I2C_SCRIPT,
            [VhostUserDevice(sock, "vhost-user-i2c-device")],
            workdir=tmp_path / "guest",
            timeout=GUEST_TIMEOUT,
        )
        with guest:
            guest.start()
            guest.wait_for_console("@@WRITTEN", GUEST_TIMEOUT)
            written = [control.ask("0x50 read 0x10 1"), control.ask("0x50 read 0x20 4")]
            assert control.ask("0x48 temp 31.5") == "OK"
            assert control.ask("0x50 write 0x40 0x5a") == "OK"
            result = guest.wait()
        assert daemon.poll() is None, "the daemon died"
    r = result.results
    print(r, written, f"guest {result.elapsed:.1f}s")
    assert "i2c_virtio" in r["adapters"]
    assert r["found"].split() == ["48", "50"]  # i2cdetect: the two targets and no one else
    assert r["eeprom10"] == "0xab" and r["eeprom20"] == "0x01 0x02 0x03 0x04"
    assert r["dump10"].startswith("10: ab ff")
    assert r["temp"] == "0x0019"  # 25.0 °C, the LM75's MSB first read as an SMBus word
    assert written == ["OK ab", "OK 01 02 03 04"]  # what the guest wrote, seen by the host
    assert r["eeprom40"] == "0x5a" and r["temp_after"] == "0x801f"  # 31.5 °C from the host
    assert _features(r, 34)[:1] == "1"  # VIRTIO_I2C_F_ZERO_LENGTH_REQUEST
