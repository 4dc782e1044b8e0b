"""Power (W) and energy (J) of this machine, from the sensors it really has: NVIDIA GPUs (NVML through ctypes, else
nvidia-smi), RAPL (the powercap sysfs tree: CPU packages, their cores and DRAM) and hwmon (power*_input /
power*_average in µW, energy*_input in µJ). A machine with none of them has no reading: callers say "not available",
never a guess.

Counters, not snapshots: RAPL's energy_uj wraps at max_energy_range_uj (about 262 kJ on many Intel packages: every
20-40 minutes at full load), so `EnergyMeter` keeps a running total that adds each reading's difference, with the
wrap taken into account. It stays right as long as it is read at least once per wrap (a Prometheus scrape every few
seconds; `clawbot bench` reads it several times a second).

Which readings add up (`Reading.counted`): every GPU; the top-level RAPL zones of the CPU packages (their subzones,
`core`/`uncore`/`dram`, are parts of, or beside, the package, and `psys` covers the whole platform, so they are
reported but not added); hwmon sensors unless they repeat RAPL (amd_energy, zenpower) on a machine that has RAPL.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

POWERCAP_ROOT = "/sys/class/powercap"
HWMON_ROOT = "/sys/class/hwmon"
NOT_AVAILABLE = "not available"
# hwmon drivers that report the same CPU energy RAPL does
HWMON_REPEATS_RAPL = frozenset({"amd_energy", "zenpower"})
NVIDIA_SMI_QUERY = "index,name,power.draw,total_energy_consumption"
NVIDIA_SMI_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Reading:
    """One sensor, read once."""

    sensor: str  # stable id: "nvidia:0", "rapl:intel-rapl:0", "hwmon:hwmon3/power1"
    kind: str  # gpu | cpu-package | cpu-core | cpu-uncore | dram | platform | other
    label: str  # what the sensor calls itself: "NVIDIA H200", "package-0", "amdgpu PPT"
    energy_j: float | None = None  # the raw cumulative counter (may wrap, see wrap_j); None: power only
    power_w: float | None = None  # instantaneous (or the sensor's own short average) power; None: energy only
    wrap_j: float | None = None  # the counter goes back to 0 after this many joules (RAPL); None: no known wrap
    counted: bool = True  # added into totals (False: part of, or the same as, another counted reading)


# --------------------------------------------------------------------------- RAPL (powercap)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:  # a missing file, or energy_uj readable by root only (since 2020 kernels, CVE-2020-8694)
        return None


def _read_int(path: Path) -> int | None:
    text = _read_text(path)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _rapl_kind(name: str) -> str:
    if name.startswith("package"):
        return "cpu-package"
    return {"core": "cpu-core", "uncore": "cpu-uncore", "dram": "dram", "psys": "platform"}.get(name, "other")


def read_rapl(root: str | os.PathLike = POWERCAP_ROOT) -> list[Reading]:
    """Every readable RAPL zone under the powercap tree (intel-rapl:N and intel-rapl:N:M; AMD's kernels use the same
    names). intel-rapl-mmio zones repeat the package zones through another interface: skipped."""
    base = Path(root)
    out: list[Reading] = []
    if not base.is_dir():
        return out
    for zone in sorted(base.iterdir(), key=lambda p: p.name):
        if not zone.name.startswith("intel-rapl:"):
            continue
        energy = _read_int(zone / "energy_uj")
        if energy is None:
            continue
        name = _read_text(zone / "name") or zone.name
        wrap = _read_int(zone / "max_energy_range_uj")
        kind = _rapl_kind(name)
        top_level = zone.name.count(":") == 1
        out.append(Reading(sensor=f"rapl:{zone.name}", kind=kind, label=name, energy_j=energy / 1e6,
                           wrap_j=(wrap / 1e6) if wrap else None,
                           counted=top_level and kind in ("cpu-package", "dram")))
    return out


# --------------------------------------------------------------------------- hwmon


def read_hwmon(root: str | os.PathLike = HWMON_ROOT, *, rapl_present: bool = False) -> list[Reading]:
    """power*_input / power*_average (µW) and energy*_input (µJ) of every hwmon device; one Reading per channel
    (a device's powerN and energyN of the same N are one sensor)."""
    base = Path(root)
    out: list[Reading] = []
    if not base.is_dir():
        return out
    for device in sorted(base.iterdir(), key=lambda p: p.name):
        try:
            names = sorted(p.name for p in device.iterdir())
        except OSError:
            continue
        driver = _read_text(device / "name") or device.name
        channels: dict[str, dict] = {}
        for fname in names:
            for prefix, key in (("power", "power"), ("energy", "energy")):
                if not fname.startswith(prefix):
                    continue
                rest = fname[len(prefix):]
                number, _, suffix = rest.partition("_")
                if not number.isdigit() or suffix not in ("input", "average"):
                    continue
                if key == "energy" and suffix != "input":
                    continue
                channel = channels.setdefault(number, {})
                value = _read_int(device / fname)
                if value is None:
                    continue
                if key == "power":
                    # power*_input is the sensor's instantaneous value; _average where only that exists (amdgpu)
                    if suffix == "input" or "power" not in channel:
                        channel["power"] = value / 1e6
                else:
                    channel["energy"] = value / 1e6
        for number, values in sorted(channels.items(), key=lambda kv: int(kv[0])):
            if not values:
                continue
            label = (_read_text(device / f"power{number}_label") or _read_text(device / f"energy{number}_label")
                     or f"channel {number}")
            kind = "gpu" if driver in ("amdgpu", "nouveau", "i915", "xe") else "other"
            out.append(Reading(sensor=f"hwmon:{device.name}/{number}", kind=kind, label=f"{driver} {label}",
                               energy_j=values.get("energy"), power_w=values.get("power"),
                               counted=not (rapl_present and driver in HWMON_REPEATS_RAPL)))
    return out


# --------------------------------------------------------------------------- NVIDIA


class _Nvml:
    """The few NVML calls needed, through ctypes (libnvidia-ml ships with the driver; no Python package)."""

    def __init__(self):
        self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        if self.lib.nvmlInit_v2() != 0:
            raise OSError("nvmlInit_v2 failed")
        count = ctypes.c_uint()
        if self.lib.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
            raise OSError("nvmlDeviceGetCount_v2 failed")
        self.handles = []
        for index in range(count.value):
            handle = ctypes.c_void_p()
            if self.lib.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle)) != 0:
                raise OSError(f"nvmlDeviceGetHandleByIndex_v2({index}) failed")
            name = ctypes.create_string_buffer(96)
            self.lib.nvmlDeviceGetName(handle, name, 96)
            self.handles.append((index, handle, name.value.decode(errors="replace")))

    def read(self) -> list[Reading]:
        out = []
        for index, handle, name in self.handles:
            milliwatts, millijoules = ctypes.c_uint(), ctypes.c_ulonglong()
            power = milliwatts.value / 1000 if self.lib.nvmlDeviceGetPowerUsage(handle, ctypes.byref(milliwatts)) == 0 \
                else None
            energy = millijoules.value / 1000 if self.lib.nvmlDeviceGetTotalEnergyConsumption(
                handle, ctypes.byref(millijoules)) == 0 else None
            if power is not None or energy is not None:
                out.append(Reading(sensor=f"nvidia:{index}", kind="gpu", label=name, energy_j=energy, power_w=power))
        return out


def _number(text: str) -> float | None:
    text = text.strip()
    try:
        return float(text)
    except ValueError:  # "[N/A]", "[Not Supported]"
        return None


def parse_nvidia_smi(csv: str) -> list[Reading]:
    """`nvidia-smi --query-gpu=index,name,power.draw,total_energy_consumption --format=csv,noheader,nounits`: power
    in W, energy in mJ since the driver loaded."""
    out = []
    for line in csv.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 4:
            continue
        power, energy_mj = _number(parts[2]), _number(parts[3])
        if power is None and energy_mj is None:
            continue
        out.append(Reading(sensor=f"nvidia:{parts[0]}", kind="gpu", label=parts[1], power_w=power,
                           energy_j=None if energy_mj is None else energy_mj / 1000))
    return out


def read_nvidia_smi() -> list[Reading]:
    try:
        proc = subprocess.run(["nvidia-smi", f"--query-gpu={NVIDIA_SMI_QUERY}", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return []
    return parse_nvidia_smi(proc.stdout) if proc.returncode == 0 else []


# --------------------------------------------------------------------------- all sensors


class Sensors:
    """Every sensor of this machine; `read()` returns them all at once. NVML is opened once (fast enough to read
    many times a second); without it nvidia-smi is asked (tens of milliseconds a read)."""

    def __init__(self, powercap_root: str | os.PathLike = POWERCAP_ROOT, hwmon_root: str | os.PathLike = HWMON_ROOT,
                 nvidia: bool = True, nvidia_reader=None):
        self.powercap_root, self.hwmon_root = powercap_root, hwmon_root
        self._nvidia_reader = nvidia_reader
        self.nvidia_via = "none"
        if nvidia and nvidia_reader is None:
            try:
                nvml = _Nvml()
                self._nvidia_reader, self.nvidia_via = nvml.read, "nvml"
            except (OSError, AttributeError):
                if read_nvidia_smi():
                    self._nvidia_reader, self.nvidia_via = read_nvidia_smi, "nvidia-smi"
        elif nvidia_reader is not None:
            self.nvidia_via = "given"

    def read(self) -> list[Reading]:
        rapl = read_rapl(self.powercap_root)
        readings = list(self._nvidia_reader() if self._nvidia_reader else [])
        readings += rapl
        readings += read_hwmon(self.hwmon_root, rapl_present=bool(rapl))
        return readings


@dataclass
class _Track:
    last_raw: float
    total_j: float = 0.0


@dataclass
class EnergyMeter:
    """Monotonic joules per sensor from raw counters that wrap (RAPL) or reset (a reloaded driver)."""

    tracks: dict[str, _Track] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def update(self, readings: list[Reading]) -> dict[str, float]:
        """Add each counter's difference since the last update; returns {sensor: joules since the first update}."""
        with self.lock:
            for r in readings:
                if r.energy_j is None:
                    continue
                track = self.tracks.get(r.sensor)
                if track is None:
                    self.tracks[r.sensor] = _Track(last_raw=r.energy_j)
                    continue
                delta = r.energy_j - track.last_raw
                if delta < 0:
                    # wrapped at max_energy_range_uj (RAPL), else a reset: count from the new value
                    delta = (r.wrap_j - track.last_raw + r.energy_j) if r.wrap_j else r.energy_j
                track.total_j += delta
                track.last_raw = r.energy_j
            return {sensor: track.total_j for sensor, track in self.tracks.items()}


def describe(readings: list[Reading]) -> str:
    """One line for humans: what this machine measures, or NOT_AVAILABLE."""
    if not readings:
        return f"power/energy: {NOT_AVAILABLE} (no NVIDIA GPU, RAPL zone or hwmon power sensor readable here)"
    return "power/energy: " + ", ".join(
        f"{r.sensor} ({r.label}: {'energy' if r.energy_j is not None else ''}"
        f"{'+' if r.energy_j is not None and r.power_w is not None else ''}"
        f"{'power' if r.power_w is not None else ''})" for r in readings)


# --------------------------------------------------------------------------- sampling over an interval


@dataclass
class Sample:
    t: float  # time.perf_counter()
    power_w: float | None  # sum of the counted sensors' power; None when none reports power
    energy_j: float | None  # sum of the counted sensors' monotonic energy; None when none has a counter


class Sampler:
    """Reads the sensors every interval_s in a thread: power samples and monotonic energy, summed over the counted
    sensors. `window(t0, t1)` gives the energy between two instants (counter difference where the sensors have
    counters, else the power samples integrated) with the sample count and the real interval."""

    def __init__(self, sensors: Sensors | None = None, interval_s: float = 0.1, read=None):
        self.sensors = sensors
        self._read = read or (sensors.read if sensors else (lambda: []))
        self.interval_s = interval_s
        self.meter = EnergyMeter()
        self.samples: list[Sample] = []
        self.sensor_info: list[Reading] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample_once(self) -> Sample:
        readings = self._read()
        t = time.perf_counter()
        totals = self.meter.update(readings)
        counted = [r for r in readings if r.counted]
        if not self.sensor_info:
            self.sensor_info = readings
        powers = [r.power_w for r in counted if r.power_w is not None]
        energies = [totals[r.sensor] for r in counted if r.energy_j is not None and r.sensor in totals]
        sample = Sample(t=t, power_w=sum(powers) if powers else None, energy_j=sum(energies) if energies else None)
        self.samples.append(sample)
        return sample

    @property
    def available(self) -> bool:
        return bool(self.sensor_info)

    def start(self) -> "Sampler":
        self.sample_once()
        if not self.available:
            return self

        def loop():
            while not self._stop.wait(self.interval_s):
                try:
                    self.sample_once()
                except Exception:  # a sensor that vanished must not kill the benchmark
                    pass
        self._thread = threading.Thread(target=loop, name="power-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)

    def window(self, t0: float, t1: float) -> dict:
        """Energy and power between t0 and t1 (perf_counter times)."""
        if not self.available:
            return {"available": False, "why": NOT_AVAILABLE}
        inside = [s for s in self.samples if t0 <= s.t <= t1]
        out: dict = {"available": True, "samples": len(inside),
                     "interval_s": round((inside[-1].t - inside[0].t) / (len(inside) - 1), 4) if len(inside) > 1
                     else None, "window_s": round(t1 - t0, 4)}
        powers = [s.power_w for s in inside if s.power_w is not None]
        out["mean_power_w"] = round(sum(powers) / len(powers), 2) if powers else None
        out["max_power_w"] = round(max(powers), 2) if powers else None
        # energy: the monotonic counter interpolated at t0 and t1 between the samples around each; else power
        # integrated over the samples
        e0, e1 = self._energy_at(t0), self._energy_at(t1)
        if e0 is not None and e1 is not None:
            out["energy_j"] = round(e1 - e0, 3)
            out["method"] = "energy counters"
        elif len(powers) >= 2:
            pts = [(s.t, s.power_w) for s in inside if s.power_w is not None]
            joules = sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in zip(pts, pts[1:]))
            # the part of the window before the first and after the last sample at the edge samples' power
            joules += (pts[0][0] - t0) * pts[0][1] + (t1 - pts[-1][0]) * pts[-1][1]
            out["energy_j"] = round(joules, 3)
            out["method"] = "power samples integrated"
        else:
            out["energy_j"] = None
            out["method"] = "too few samples in the window"
        return out

    def counter_update_s(self) -> float | None:
        """How often the summed energy really changes (median time between samples that saw it move): a sensor
        can be read faster than it updates. None without an energy counter or with fewer than two changes."""
        with_energy = [s for s in self.samples if s.energy_j is not None]
        changes = [b.t for a, b in zip(with_energy, with_energy[1:]) if b.energy_j != a.energy_j]
        if len(changes) < 2:
            return None
        gaps = sorted(b - a for a, b in zip(changes, changes[1:]))
        return gaps[len(gaps) // 2]

    def _energy_at(self, t: float) -> float | None:
        with_energy = [s for s in self.samples if s.energy_j is not None]
        before = [s for s in with_energy if s.t <= t]
        after = [s for s in with_energy if s.t >= t]
        if not before or not after:
            return None
        a, b = before[-1], after[0]
        if b.t == a.t:
            return a.energy_j
        return a.energy_j + (b.energy_j - a.energy_j) * (t - a.t) / (b.t - a.t)

    def sensors_json(self) -> list[dict]:
        return [{"sensor": r.sensor, "kind": r.kind, "label": r.label, "energy_counter": r.energy_j is not None,
                 "power": r.power_w is not None, "counted": r.counted} for r in self.sensor_info]
