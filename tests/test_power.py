"""clawbot.model.power: RAPL, hwmon and NVIDIA readers, the wrap-safe energy meter, the sampler behind `clawbot bench`'s
joules per token, and the model agent's power series in /metrics.

These VMs have no RAPL (powercap) and no hwmon power sensor, so the readers are tested on a sysfs tree constructed
after the kernel's documented layout (tests/fixtures/sysfs-power/README.md), not one recorded on a real machine; the
GPU machine's real readings are in benchmarks/results/gpu-h200*.json.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from clawbot.model import power

FIXTURE = Path(__file__).parent / "fixtures" / "sysfs-power"


@pytest.fixture
def tree(tmp_path) -> Path:
    copy = tmp_path / "sys"
    shutil.copytree(FIXTURE, copy)
    return copy


def _by_sensor(readings):
    return {r.sensor: r for r in readings}


def test_rapl_zones_with_units_wrap_ranges_and_what_adds_up(tree):
    zones = _by_sensor(power.read_rapl(tree / "powercap"))
    # the control type `intel-rapl` has no counter and the mmio interface repeats package-0: neither is read
    assert set(zones) == {"rapl:intel-rapl:0", "rapl:intel-rapl:0:0", "rapl:intel-rapl:0:1", "rapl:intel-rapl:1",
                          "rapl:intel-rapl:2"}
    pkg = zones["rapl:intel-rapl:0"]
    assert (pkg.kind, pkg.label, pkg.power_w) == ("cpu-package", "package-0", None)
    assert pkg.energy_j == pytest.approx(262100.0) and pkg.wrap_j == pytest.approx(262143.32885)
    assert zones["rapl:intel-rapl:0:0"].kind == "cpu-core"
    assert zones["rapl:intel-rapl:0:1"].kind == "dram"
    assert zones["rapl:intel-rapl:2"].kind == "platform"
    # only the top-level packages add up: core and dram subzones are inside package-0's count, psys covers all
    assert {s for s, r in zones.items() if r.counted} == {"rapl:intel-rapl:0", "rapl:intel-rapl:1"}


def test_an_unreadable_counter_is_no_reading(tree):
    """energy_uj is 0400 root on kernels since 2020 (CVE-2020-8694): the agent's user gets no reading, not a zero."""
    (tree / "powercap" / "intel-rapl:1" / "energy_uj").unlink()
    assert "rapl:intel-rapl:1" not in _by_sensor(power.read_rapl(tree / "powercap"))
    assert power.read_rapl(tree / "absent") == []


def test_hwmon_power_and_energy_channels(tree):
    readings = _by_sensor(power.read_hwmon(tree / "hwmon", rapl_present=True))
    assert set(readings) == {"hwmon:hwmon1/1", "hwmon:hwmon2/1", "hwmon:hwmon2/17"}  # k10temp: temperatures only
    gpu = readings["hwmon:hwmon1/1"]
    assert (gpu.kind, gpu.label, gpu.power_w, gpu.energy_j) == ("gpu", "amdgpu PPT", 35.0, None)
    assert readings["hwmon:hwmon2/17"].energy_j == pytest.approx(900.0)
    assert readings["hwmon:hwmon2/17"].label == "amd_energy Esocket0"
    # amd_energy repeats RAPL: reported, not added, where RAPL is there; added where it is the only CPU sensor
    assert not readings["hwmon:hwmon2/17"].counted and gpu.counted
    alone = _by_sensor(power.read_hwmon(tree / "hwmon", rapl_present=False))
    assert alone["hwmon:hwmon2/17"].counted


def test_power_input_wins_over_average(tree):
    (tree / "hwmon" / "hwmon1" / "power1_input").write_text("41000000\n")
    (gpu,) = [r for r in power.read_hwmon(tree / "hwmon") if r.sensor == "hwmon:hwmon1/1"]
    assert gpu.power_w == 41.0


def test_the_meter_survives_the_rapl_wrap(tree):
    """package-0 sits 43.33 J below max_energy_range_uj; 100 J later its counter reads 56.67 J: the meter adds 100 J,
    not -262043 J."""
    sensors = power.Sensors(tree / "powercap", tree / "hwmon", nvidia=False)
    meter = power.EnergyMeter()
    assert meter.update(sensors.read())["rapl:intel-rapl:0"] == 0.0
    (tree / "powercap" / "intel-rapl:0" / "energy_uj").write_text(f"{262100000000 + 30_000_000}\n")
    assert meter.update(sensors.read())["rapl:intel-rapl:0"] == pytest.approx(30.0)
    wrapped = 100_000_000 - 43_328_850  # 100 J after the first reading, past the wrap
    (tree / "powercap" / "intel-rapl:0" / "energy_uj").write_text(f"{wrapped}\n")
    assert meter.update(sensors.read())["rapl:intel-rapl:0"] == pytest.approx(100.0)
    # hwmon energy has no wrap range: a counter that goes back (driver reloaded) counts from its new value
    (tree / "hwmon" / "hwmon2" / "energy17_input").write_text("2000000\n")
    assert meter.update(sensors.read())["hwmon:hwmon2/17"] == pytest.approx(2.0)


def test_sampler_energy_in_a_window_from_counters_and_from_power_alone(tree, monkeypatch):
    clock = iter(range(100))
    fake_now = {"t": 0.0}

    def read():
        # package-0 uses 50 W: 5 J per 0.1 s step; amdgpu reports 35 W and has no counter
        fake_now["t"] = next(clock) * 0.1
        (tree / "powercap" / "intel-rapl:0" / "energy_uj").write_text(
            f"{int((100 + 50 * fake_now['t']) * 1e6)}\n")
        return power.Sensors(tree / "powercap", tree / "hwmon", nvidia=False).read()

    sampler = power.Sampler(read=read, interval_s=0.1)
    monkeypatch.setattr(power.time, "perf_counter", lambda: fake_now["t"])
    for _ in range(11):
        sampler.sample_once()
    window = sampler.window(0.25, 0.75)
    assert window["available"] and window["method"] == "energy counters"
    assert window["samples"] == 5 and window["interval_s"] == pytest.approx(0.1)
    # package-0 and package-1 (a constant counter) are counted; psys, the subzones and amd_energy are not
    assert window["energy_j"] == pytest.approx(25.0)
    assert window["mean_power_w"] == pytest.approx(35.0)  # only amdgpu reports power

    only_power = power.Sampler(read=lambda: [power.Reading("x", "gpu", "x", power_w=200.0)])
    monkeypatch.setattr(power.time, "perf_counter", iter([0.0, 0.5, 1.0]).__next__)
    for _ in range(3):
        only_power.sample_once()
    integrated = only_power.window(0.0, 1.0)
    assert integrated["method"] == "power samples integrated" and integrated["energy_j"] == pytest.approx(200.0)


def test_no_sensor_is_not_available_never_zero(tmp_path):
    sensors = power.Sensors(tmp_path / "none", tmp_path / "none", nvidia=False)
    assert sensors.read() == []
    sampler = power.Sampler(sensors).start()
    sampler.stop()
    assert sampler.window(0, 1) == {"available": False, "why": "not available"}
    assert "not available" in power.describe([])


def test_nvidia_smi_output_and_a_card_without_an_energy_counter():
    readings = power.parse_nvidia_smi("0, NVIDIA H200, 118.42, 81234567\n1, Tesla T4, 27.10, [N/A]\n"
                                      "2, Old Card, [N/A], [N/A]\n")
    assert [(r.sensor, r.label, r.power_w, r.energy_j) for r in readings] == [
        ("nvidia:0", "NVIDIA H200", 118.42, pytest.approx(81234.567)), ("nvidia:1", "Tesla T4", 27.1, None)]


def test_nvidia_smi_is_asked_when_nvml_is_missing(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho '0, NVIDIA H200, 120.5, 5000'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}/usr/bin:/bin")
    monkeypatch.setattr(power, "_Nvml", lambda: (_ for _ in ()).throw(OSError("no libnvidia-ml")))
    sensors = power.Sensors(tmp_path / "none", tmp_path / "none")
    assert sensors.nvidia_via == "nvidia-smi"
    (gpu,) = sensors.read()
    assert (gpu.sensor, gpu.power_w, gpu.energy_j) == ("nvidia:0", 120.5, 5.0)


def test_the_model_agents_metrics_name_every_sensor(tree):
    """NodeCollector's power series (what docs/monitoring.md names): watts per sensor, a joules counter per sensor
    with a counter, and the number of sensors (0 on a node without any)."""
    from prometheus_client.core import CollectorRegistry
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from clawbot.model.gateway import NodeCollector

    class _Only:  # NodeCollector's power part alone (the rest reads a whole gateway's /status)
        def __init__(self, sensors):
            self.node = NodeCollector(None, sensors=sensors)

        def describe(self):
            return []

        def collect(self):
            return self.node._power()

    def scrape(sensors) -> dict:
        registry = CollectorRegistry()
        registry.register(_Only(sensors))
        text = generate_latest(registry).decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    values = scrape(power.Sensors(tree / "powercap", tree / "hwmon", nvidia=False))
    assert values[("clawbot_node_power_sensors", ())] == 8
    assert values[("clawbot_node_power_watts", (("kind", "gpu"), ("label", "amdgpu PPT"),
                                                ("sensor", "hwmon:hwmon1/1")))] == 35.0
    assert values[("clawbot_node_energy_joules_total", (("counted", "true"), ("kind", "cpu-package"),
                                                        ("label", "package-0"), ("sensor", "rapl:intel-rapl:0")))] == 0
    assert not [k for k in values if k[0] == "clawbot_node_energy_joules_total" and ("sensor", "hwmon:hwmon1/1") in k[1]]
    empty = scrape(power.Sensors(tree / "none", tree / "none", nvidia=False))
    assert empty == {("clawbot_node_power_sensors", ()): 0}
