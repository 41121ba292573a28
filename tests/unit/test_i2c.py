"""virtio-i2c through the in-process driver: who answers on the bus, the 24C02 EEPROM and the
LM75 sensor as i2c-tools use them, FAIL_NEXT groups, hostile requests, the control socket and
``pyvirtio i2c`` over vhost-user with a model of one's own."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvirtio.devices.control import ControlError
from pyvirtio.devices.i2c import (
    DEFAULT_DEVICE_LIST,
    MAX_SEGMENT,
    Eeprom24c02,
    I2cBus,
    I2cDevice,
    I2cTarget,
    Lm75,
    parse_device_list,
)
from pyvirtio.driver.i2c import I2cDriver, Message
from pyvirtio.driver.mmio import DriverError
from pyvirtio.management.client import ControlClient, ControlClientError
from pyvirtio.shims.inprocess import InProcessMachine
from pyvirtio.spec.features import Feature, bit
from pyvirtio.spec.i2c import OUT_HDR, I2cFlag
from pyvirtio.spec.status import DeviceStatus


@dataclass
class Rig:
    bus: I2cBus
    machine: InProcessMachine
    driver: I2cDriver

    @property
    def eeprom(self) -> Eeprom24c02:
        target = self.bus.targets[0x50]
        assert isinstance(target, Eeprom24c02)
        return target


@pytest.fixture
def rig() -> Iterator[Rig]:
    bus = I2cBus(parse_device_list(DEFAULT_DEVICE_LIST))
    machine = InProcessMachine(I2cDevice(bus), memory_size=1 << 20)
    try:
        yield Rig(bus, machine, I2cDriver(machine.driver()))
    finally:
        machine.close()


def test_only_the_targets_answer(rig: Rig) -> None:
    found = [a for a in range(0x08, 0x78) if rig.driver.quick_write(a)]
    assert found == [0x48, 0x50]
    read_quick = rig.driver.transfer([Message(0x50, read=True)])  # a zero-length read
    assert read_quick == [b""]


def test_the_feature_is_mandatory() -> None:
    with InProcessMachine(I2cDevice(I2cBus()), memory_size=1 << 20) as machine:
        transport = machine.driver()
        with pytest.raises(DriverError, match="FEATURES_OK"):
            transport.negotiate(bit(Feature.VERSION_1))  # without ZERO_LENGTH_REQUEST


def test_eeprom_bytes_as_i2cset_and_i2cget_move_them(rig: Rig) -> None:
    drv = rig.driver
    assert drv.read_byte_data(0x50, 0x10) == 0xFF  # erased
    assert drv.write_byte_data(0x50, 0x10, 0xAB)
    assert drv.read_byte_data(0x50, 0x10) == 0xAB
    assert rig.eeprom.memory[0x10] == 0xAB


def test_eeprom_page_writes_wrap_in_the_page_and_reads_in_the_memory(rig: Rig) -> None:
    drv = rig.driver
    # 8-byte pages: a write from 0x1e wraps to 0x18 after 0x1f, as the chip does
    assert drv.transfer([Message(0x50, bytes([0x1E, 1, 2, 3, 4]))]) == [b""]
    assert rig.eeprom.memory[0x18:0x20] == bytes([3, 4]) + b"\xff" * 4 + bytes([1, 2])
    rig.eeprom.memory[0xFE:0x100] = b"\x11\x22"
    rig.eeprom.memory[0:2] = b"\x33\x44"
    assert drv.read_register(0x50, 0xFE, 4) == b"\x11\x22\x33\x44"  # reads wrap at 256
    # a read goes on where the last one stopped (a "current address read")
    assert drv.transfer([Message(0x50, read=True, length=1)]) == [b"\xff"]
    big = drv.read_register(0x50, 0, 600)  # longer than the memory: round and round
    assert big is not None and big[:256] == big[256:512] == bytes(rig.eeprom.memory)


def test_lm75_registers(rig: Rig) -> None:
    drv = rig.driver
    assert drv.read_register(0x48, 0, 2) == b"\x19\x00"  # 25.0 °C, MSB first
    assert drv.read_register(0x48, 2, 2) == b"\x4b\x00"  # T_HYST 75 °C
    assert drv.read_register(0x48, 3, 2) == b"\x50\x00"  # T_OS 80 °C
    assert drv.transfer([Message(0x48, bytes([3, 0x3C, 0x80]))]) == [b""]  # T_OS 60.5
    assert drv.read_register(0x48, 3, 2) == b"\x3c\x80"
    assert drv.transfer([Message(0x48, bytes([1, 0x02]))]) == [b""]  # configuration
    assert drv.read_register(0x48, 1, 2) == b"\x02\x02"
    assert drv.transfer([Message(0x48, bytes([0, 1, 2]))]) == [None]  # temperature: read-only
    assert drv.transfer([Message(0x48, bytes([4]))]) == [None]  # no register 4
    lm75 = rig.bus.targets[0x48]
    lm75.control(["temp", "-10.5"])
    assert drv.read_register(0x48, 0, 2) == b"\xf5\x80"
    assert lm75.control(["temp"]) == "-10.5"
    for bad in ("200", "nan", "x"):
        with pytest.raises(ControlError):
            lm75.control(["temp", bad])


def test_a_failed_request_fails_the_rest_of_its_group(rig: Rig) -> None:
    drv = rig.driver
    # nobody at 0x20: the EEPROM write after it in the same group does not happen
    got = drv.transfer([Message(0x20, b"\x00"), Message(0x50, bytes([0x00, 0x55]))])
    assert got == [None, None]
    assert rig.eeprom.memory[0] == 0xFF
    # the next group runs
    assert drv.transfer([Message(0x50, bytes([0x00, 0x55]))]) == [b""]
    assert rig.eeprom.memory[0] == 0x55
    # a failure in the middle: what came before it happened
    got = drv.transfer(
        [Message(0x50, bytes([0x01, 0x66])), Message(0x48, b"\x09"), Message(0x50, b"\x00")]
    )
    assert got == [b"", None, None]
    assert rig.eeprom.memory[1] == 0x66


def _raw(rig: Rig, out: list[bytes], in_sizes: list[int]) -> tuple[int, bytes]:
    memory, allocator = rig.machine.memory, rig.machine.allocator
    outs = []
    for data in out:
        addr = allocator.alloc(max(1, len(data)))
        memory.write(addr, data)
        outs.append((addr, len(data)))
    ins = [(allocator.alloc(max(1, n)), n) for n in in_sizes]
    for addr, n in ins:
        memory.write(addr, b"\xee" * n)
    queue = rig.driver.transport.queues[0]
    queue.add(outs, ins, "raw", indirect=False)
    rig.driver.transport.notify(0)
    used = queue.get_used()
    return (used[0][1] if used else -1), b"".join(memory.read(a, n) for a, n in ins)


def _hdr(address: int, flags: int = 0) -> bytes:
    return OUT_HDR.pack(address << 1, 0, flags)


def test_malformed_requests_get_an_error_status(rig: Rig) -> None:
    rd = I2cFlag.M_RD
    assert _raw(rig, [_hdr(0x50)], [1]) == (1, b"\x00")  # well formed: a quick write
    assert _raw(rig, [_hdr(0x50)[:5]], [1]) == (1, b"\x01")  # short header
    assert _raw(rig, [_hdr(0x50, 1 << 5)], [1]) == (1, b"\x01")  # reserved flag
    assert _raw(rig, [_hdr(0x50, rd), b"x"], [1]) == (1, b"\x01")  # a read with data to write
    assert _raw(rig, [_hdr(0x50)], [4, 1]) == (1, b"\xee" * 4 + b"\x01")  # a write with room
    assert _raw(rig, [OUT_HDR.pack(0xA1, 0, 0)], [1]) == (1, b"\x01")  # bit 0 of addr
    assert _raw(rig, [OUT_HDR.pack(0x50 << 8 | 0xF0, 0, 0)], [1]) == (1, b"\x01")  # 10-bit
    # a read longer than an I2C message can be is refused without being made
    assert _raw(rig, [_hdr(0x50, rd)], [MAX_SEGMENT + 1, 1])[0] == 1
    # the header split across descriptors, the data and status in one buffer
    hdr = _hdr(0x50, rd)
    written, data = _raw(rig, [hdr[:3], hdr[3:]], [4])
    assert written == 4 and data[3] == 0
    assert not rig.driver.transport.status & DeviceStatus.NEEDS_RESET
    assert rig.driver.quick_write(0x48)


def test_a_request_without_a_status_byte_needs_reset(rig: Rig) -> None:
    _raw(rig, [_hdr(0x50), b"\x00"], [])
    assert rig.driver.transport.status & DeviceStatus.NEEDS_RESET


class _Broken(I2cTarget):
    kind = "broken"

    def write(self, data: bytes) -> bool:
        raise RuntimeError("model bug")

    def read(self, length: int) -> bytes:
        return b"short"


def test_a_model_that_fails_is_a_nack() -> None:
    bus = I2cBus([_Broken(0x20)])
    with InProcessMachine(I2cDevice(bus), memory_size=1 << 20) as machine:
        drv = I2cDriver(machine.driver())
        assert not drv.quick_write(0x20)
        assert drv.transfer([Message(0x20, read=True, length=2)]) == [None]  # wrong length
        assert not machine.driver().status & DeviceStatus.NEEDS_RESET


@pytest.mark.parametrize(
    "spec",
    [
        "eeprom:80",
        "24c02",
        "24c02:80:80",
        "24c02:0x7f",
        "24c02:3",
        "lm75:x",
        "0:80",
        "lm75:72,24c02:72",
    ],
)
def test_bad_device_lists(spec: str) -> None:
    with pytest.raises(ValueError):
        I2cBus(parse_device_list(spec))


def test_device_list_like_vhost_device_i2c() -> None:
    bus = I2cBus(parse_device_list("24c02:80:0x51,lm75:72"))
    assert {a: t.kind for a, t in bus.targets.items()} == {
        0x50: "24c02",
        0x51: "24c02",
        0x48: "lm75",
    }
    assert bus.control(["list"]) == "0x48=lm75 0x50=24c02 0x51=24c02"
    assert bus.control(["0x50", "write", "0", "1", "0x02"]) == ""
    assert bus.control(["80", "read", "0", "3"]) == "01 02 ff"
    for bad in (["0x20", "read"], ["0x50"], ["0x50", "read", "255", "2"], ["0x48", "x"]):
        with pytest.raises(ControlError):
            bus.control(bad)


MODEL = '''
from pyvirtio.devices.i2c import I2cTarget


class Counter(I2cTarget):
    """Counts the bytes written to it; reads return the count."""

    kind = "counter"

    def __init__(self, address: int, start: int = 0) -> None:
        super().__init__(address)
        self.count = start

    def write(self, data: bytes) -> bool:
        self.count += len(data)
        return True

    def read(self, length: int) -> bytes:
        return bytes([self.count % 256]) * length
'''


def test_i2c_command_serves_over_vhost_user(tmp_path: Path) -> None:
    from pyvirtio.driver.vhost_user import VhostUserDriver
    from pyvirtio.spec.ids import DeviceId

    (tmp_path / "mymodels.py").write_text(MODEL)
    sock, ctl = tmp_path / "i2c.sock", tmp_path / "i2c.ctl"
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "pyvirtio", "i2c", "--socket-path", str(sock)),
            *("-l", "24c02:80,lm75:72", "--control-socket", str(ctl)),
            *("--model", "mymodels:Counter", "--arg", "address=0x20", "--arg", "start=5"),
        ],
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    try:
        for _ in range(500):
            if sock.exists() and ctl.exists():
                break
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.02)
        transport = VhostUserDriver(str(sock), DeviceId.I2C_ADAPTER)
        try:
            drv = I2cDriver(transport, wait=transport.wait_interrupt)
            assert [a for a in range(0x08, 0x78) if drv.quick_write(a)] == [0x20, 0x48, 0x50]
            assert drv.transfer([Message(0x20, b"abc"), Message(0x20, read=True, length=2)]) == [
                b"",
                b"\x08\x08",
            ]
            with ControlClient(str(ctl)) as c:

                def ask(command: str) -> str:
                    reply: str = c.call("peripheral", command=command)["reply"]
                    return reply

                assert ask("list") == "0x20=counter 0x48=lm75 0x50=24c02"
                assert drv.write_byte_data(0x50, 7, 0x42)
                assert ask("0x50 read 7 1") == "42"
                assert ask("0x48 temp 31.5") == ""
                assert drv.read_register(0x48, 0, 2) == b"\x1f\x80"
                with pytest.raises(ControlClientError, match="PeripheralError"):
                    ask("0x20 temp")
        finally:
            transport.close()
        # a new front-end finds what the last one wrote (the bus outlives the device)
        transport = VhostUserDriver(str(sock), DeviceId.I2C_ADAPTER)
        try:
            drv = I2cDriver(transport, wait=transport.wait_interrupt)
            assert drv.read_byte_data(0x50, 7) == 0x42
        finally:
            transport.close()
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_i2c_command_line_errors(tmp_path: Path) -> None:
    sock = str(tmp_path / "i.sock")
    for args in (
        ["-l", "1:80"],
        ["-l", "24c02:80,lm75:80"],
        ["-l", "24c02:80", "--model", "pyvirtio.devices.i2c:Lm75", "--arg", "address=0x50"],
        ["--model", "pyvirtio.devices.i2c:I2cBus"],
        ["--arg", "address=3"],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "pyvirtio", "i2c", "--socket-path", sock, *args],
            capture_output=True,
            timeout=30,
        )
        assert proc.returncode == 2, (args, proc.stderr)
        assert b"error:" in proc.stderr


def test_builtin_targets_refuse_bad_settings() -> None:
    with pytest.raises(ValueError):
        Eeprom24c02(contents=bytes(257))
    with pytest.raises(ValueError):
        Lm75(temperature=130.0)
    with pytest.raises(ValueError):
        I2cTarget()  # no address
