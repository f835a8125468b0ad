"""Named network profiles shipped with MECBench, and the original MECBench's string NetEm config.

The original MECBench API took NetEm settings as strings (`{"bandwidth": "100mbit", "delay":
"20ms", "jitter": "5ms", "loss_rate": "0.5", "reorder": "25"}`); `netem_from_strings` turns that
into the typed `NetemConfig` (bits per second, Durations, percentages) with every bad value
reported at once.

Profile figures are one-way, applied on egress, and are representative medians, not worst cases:
- "4g" and "5g": the original MECBench's own profiles (4G: 10 ms at 12.5 Mbit/s; 5G: 1 ms at
  10 Gbit/s), kept for comparability with its published results.
- "lte": Opensignal, "The State of Mobile Network Experience" (2023): LTE download medians of
  about 20-30 Mbit/s and round-trip latencies of 40-60 ms (20 ms one way here, 5 ms jitter, 0.1%
  loss).
- "5g-sa": 3GPP TS 22.261 / ITU-R M.2410 targets for eMBB user-plane latency of 4 ms and a user
  experienced data rate of 100 Mbit/s; loss 0.01%.
- "wifi": IEEE 802.11ac home networks as measured in the FCC "Measuring Broadband America"
  reports: about 2-5 ms one-way over the air with jitter of a few ms, 100 Mbit/s, 0.1% loss.
- "satellite-geo": a geostationary hop is at least 2 x 35,786 km / c = 239 ms one way (ITU-R
  S.1711); 25 Mbit/s, 10 ms jitter, 0.5% loss.
- "satellite-leo": Starlink as measured by Michel et al., "A First Look at Starlink Performance"
  (IMC 2022): round trips of 40-50 ms, so 25 ms one way, 10 ms jitter, ~100 Mbit/s, 0.5% loss.

Time-varying links (a profile with a `schedule`: the node agent changes the qdiscs in place at each
step, from the start of each test). Traces come as CSV (`schedule_from_csv`: a header naming
`time` and any of `rate`, `delay`, `jitter`, `loss`, values in tc's units, e.g.
`0s,50mbit,,,` then `2s,5mbit,,,`) or in the Mahimahi packet-delivery format (`schedule_from_mahimahi`:
one line per 1500-byte delivery opportunity, its time in ms; the trace loops). The shipped ones are
rate-only, so that they run on kernels without netem (tbf changes in place):
- "handover-5g-4g": 20 s at the "5g-sa" rate (100 Mbit/s), a handover to the "4g" rate (12.5 Mbit/s)
  for 20 s, and back (a 60 s loop): the rates of the two shipped profiles above.
- "blackout-500ms": 50 Mbit/s with a 500 ms outage every 10 s, the outage as a 16 kbit/s trickle
  (a token bucket cannot be shut; at this rate a 50 ms queue holds a single packet).
- "slow-fade": 100 Mbit/s fading to 5 Mbit/s in 1 s steps of equal ratio over 20 s, and back.
- "step-50-5-50": 50 Mbit/s, 5 Mbit/s from 2 s, 50 Mbit/s again from 4 s (the tests' trace).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from google.protobuf.duration_pb2 import Duration

from mecbench.core import durations
from mecbench.core.errors import InvalidArgument, Violations
from mecbench.v1 import common_pb2


def _ms(value: float) -> Duration:
    return durations.from_seconds(value / 1000)


def _ms_duration(value_ms: float) -> Duration:
    return durations.from_seconds(value_ms / 1000)


def _profile(name: str, rate_bps: float, delay_ms: float, jitter_ms: float = 0.0, loss: float = 0.0
             ) -> common_pb2.NetworkProfile:
    netem = common_pb2.NetemConfig(rate_bps=int(rate_bps), loss_percent=loss)
    if delay_ms:
        netem.delay.CopyFrom(_ms(delay_ms))
    if jitter_ms:
        netem.jitter.CopyFrom(_ms(jitter_ms))
        netem.jitter_distribution = common_pb2.JITTER_DISTRIBUTION_NORMAL
    return common_pb2.NetworkProfile(name=name, netem=netem, direction=common_pb2.DIRECTION_EGRESS,
                                     side=common_pb2.SHAPING_SIDE_SUT)


PROFILES: dict[str, common_pb2.NetworkProfile] = {
    p.name: p
    for p in (
        _profile("4g", 12.5e6, 10),
        _profile("5g", 10e9, 1),
        _profile("lte", 25e6, 20, 5, 0.1),
        _profile("5g-sa", 100e6, 4, 1, 0.01),
        _profile("wifi", 100e6, 3, 2, 0.1),
        _profile("satellite-geo", 25e6, 240, 10, 0.5),
        _profile("satellite-leo", 100e6, 25, 10, 0.5),
        # No shaping at all: the reference point of a sweep.
        common_pb2.NetworkProfile(name="unshaped"),
    )
}


def resolve_profile(profile: common_pb2.NetworkProfile, field: str = "network") -> common_pb2.NetworkProfile:
    """A profile that names a shipped one and sets no netem of its own gets the shipped figures;
    one with a schedule and no netem starts at its first step's."""
    if profile.HasField("schedule") and not profile.HasField("netem"):
        if not profile.schedule.steps:
            raise InvalidArgument("a schedule needs at least one step", field=f"{field}.schedule.steps")
        resolved = common_pb2.NetworkProfile()
        resolved.CopyFrom(profile)
        resolved.netem.CopyFrom(profile.schedule.steps[0].netem)
        return resolved
    if profile.HasField("netem") or not profile.name:
        return profile
    shipped = PROFILES.get(profile.name)
    if shipped is None:
        raise InvalidArgument(f"no network profile named {profile.name!r} (shipped: {', '.join(PROFILES)})",
                              field=f"{field}.name")
    resolved = common_pb2.NetworkProfile()
    resolved.CopyFrom(shipped)
    if profile.direction:
        resolved.direction = profile.direction
    if profile.side:
        resolved.side = profile.side
    return resolved


_RATE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(bit|bps|b)?\s*$", re.IGNORECASE)
_TIME = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(us|usec|ms|msec|s|sec)?\s*$", re.IGNORECASE)
_RATE_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_TIME_UNITS = {"us": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3, "s": 1.0, "sec": 1.0, None: 1e-3}


def parse_rate(text: str) -> int:
    """'100mbit' -> 100_000_000 bits per second (tc's units: kbit, mbit, gbit; 'bps' means bytes)."""
    match = _RATE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a rate like '100mbit' or '12.5Mbit'")
    number, prefix, unit = match.groups()
    value = float(number) * _RATE_UNITS[prefix.lower()]
    if unit and unit.lower() == "bps":  # tc: "bps" is bytes per second
        value *= 8
    return int(value)


def parse_time(text: str) -> Duration:
    """'20ms' -> 20 ms; a bare number is milliseconds, as tc reads it."""
    match = _TIME.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a time like '20ms' or '1.5s'")
    number, unit = match.groups()
    return durations.from_seconds(float(number) * _TIME_UNITS[unit.lower() if unit else None])


def parse_percent(text: str) -> float:
    value = float(text.strip().rstrip("%"))
    if not 0 <= value <= 100:
        raise ValueError(f"{text!r} is not a percentage between 0 and 100")
    return value


STRING_FIELDS = {
    "bandwidth": ("rate_bps", parse_rate),
    "rate": ("rate_bps", parse_rate),
    "delay": ("delay", parse_time),
    "jitter": ("jitter", parse_time),
    "loss_rate": ("loss_percent", parse_percent),
    "loss": ("loss_percent", parse_percent),
    "reorder": ("reorder_percent", parse_percent),
    "duplicate": ("duplicate_percent", parse_percent),
    "corrupt": ("corrupt_percent", parse_percent),
}


def netem_from_strings(config: Mapping[str, str], field: str = "netem") -> common_pb2.NetemConfig:
    """The original MECBench NetEm config (strings) as a typed NetemConfig."""
    violations = Violations()
    netem = common_pb2.NetemConfig()
    for key, raw in config.items():
        if key not in STRING_FIELDS:
            violations.add(f"{field}.{key}", f"unknown setting (known: {', '.join(STRING_FIELDS)})")
            continue
        if raw is None or str(raw).strip() == "":
            continue
        target, parse = STRING_FIELDS[key]
        try:
            value = parse(str(raw))
        except ValueError as exc:
            violations.add(f"{field}.{key}", str(exc))
            continue
        if isinstance(value, Duration):
            getattr(netem, target).CopyFrom(value)
        else:
            setattr(netem, target, value)
    if netem.reorder_percent and not netem.HasField("delay"):
        violations.add(f"{field}.reorder", "reordering needs a delay (netem reorders by sending some packets at once)")
    violations.raise_if_any()
    return netem


# --- time-varying links --------------------------------------------------------------------------

TRACE_FIELDS = {"rate": "rate", "bandwidth": "rate", "delay": "delay", "jitter": "jitter", "loss": "loss"}
MAHIMAHI_PACKET_BYTES = 1500
# What a step without a single delivery opportunity gets: a token bucket cannot be shut.
MIN_RATE_BPS = 16_000


def schedule_from_csv(text: str, source: str = "", field: str = "trace") -> common_pb2.LinkSchedule:
    """A CSV trace (header `time,rate,delay,jitter,loss`, any subset after `time`; values in tc's
    units, a bare time in seconds) as a LinkSchedule; every bad cell reported at once."""
    violations = Violations()
    rows = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    schedule = common_pb2.LinkSchedule(source=source)
    if not rows:
        raise InvalidArgument("an empty trace", field=field)
    header = [h.strip().lower() for h in rows[0].split(",")]
    if not header or header[0] not in ("time", "time_s", "t"):
        raise InvalidArgument(f"the header's first column must be time, not {header[0]!r}", field=field)
    for name in header[1:]:
        if name not in TRACE_FIELDS:
            violations.add(f"{field}.header", f"unknown column {name!r} (known: {', '.join(TRACE_FIELDS)})")
    violations.raise_if_any()
    for number, row in enumerate(rows[1:], start=2):
        cells = [c.strip() for c in row.split(",")]
        where = f"{field}.line[{number}]"
        try:
            at = float(cells[0]) if _is_number(cells[0]) else durations.to_seconds(parse_time(cells[0]))
        except ValueError as exc:
            violations.add(f"{where}.time", str(exc))
            continue
        netem = common_pb2.NetemConfig()
        for name, cell in zip(header[1:], cells[1:], strict=False):
            if not cell:
                continue
            try:
                kind = TRACE_FIELDS[name]
                if kind == "rate":
                    netem.rate_bps = parse_rate(cell)
                elif kind == "loss":
                    netem.loss_percent = parse_percent(cell)
                else:
                    getattr(netem, kind).CopyFrom(parse_time(cell))
            except ValueError as exc:
                violations.add(f"{where}.{name}", str(exc))
        schedule.steps.append(common_pb2.LinkStep(at=durations.from_seconds(at), netem=netem))
    violations.raise_if_any()
    return schedule


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def schedule_from_mahimahi(text: str, bin_ms: int = 100, source: str = "",
                           field: str = "trace") -> common_pb2.LinkSchedule:
    """A Mahimahi packet-delivery trace (one line per 1500-byte delivery opportunity: its time in
    ms, repeated for several at once; the trace loops at its last time) as rate steps, one per
    `bin_ms` (merged where the rate does not change). Bins without an opportunity get MIN_RATE_BPS."""
    times: list[int] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = int(line.strip())
        except ValueError:
            raise InvalidArgument(f"line {number}: {line.strip()!r} is not a time in ms", field=field) from None
        if value < 0 or (times and value < times[-1]):
            raise InvalidArgument(f"line {number}: times must not go backwards", field=field)
        times.append(value)
    if not times:
        raise InvalidArgument("an empty trace", field=field)
    period_ms = max(times[-1], bin_ms)
    bins = [0] * -(-period_ms // bin_ms)
    for value in times:
        bins[min(value // bin_ms, len(bins) - 1)] += 1
    schedule = common_pb2.LinkSchedule(source=source, period=_ms_duration(period_ms))
    previous = -1
    for index, count in enumerate(bins):
        rate = max(MIN_RATE_BPS, count * MAHIMAHI_PACKET_BYTES * 8 * 1000 // bin_ms)
        if rate != previous:
            schedule.steps.append(common_pb2.LinkStep(at=_ms_duration(index * bin_ms),
                                                      netem=common_pb2.NetemConfig(rate_bps=rate)))
            previous = rate
    return schedule


def _rate_trace(name: str, steps: list[tuple[float, float]], period_s: float = 0.0) -> common_pb2.NetworkProfile:
    schedule = common_pb2.LinkSchedule(source=f"shipped:{name}")
    for at_s, rate_bps in steps:
        schedule.steps.append(common_pb2.LinkStep(at=durations.from_seconds(at_s),
                                                  netem=common_pb2.NetemConfig(rate_bps=int(rate_bps))))
    if period_s:
        schedule.period.CopyFrom(durations.from_seconds(period_s))
    profile = common_pb2.NetworkProfile(name=name, schedule=schedule, direction=common_pb2.DIRECTION_EGRESS,
                                        side=common_pb2.SHAPING_SIDE_SUT)
    profile.netem.CopyFrom(schedule.steps[0].netem)
    return profile


def _fade(high: float, low: float, seconds: int) -> list[tuple[float, float]]:
    ratio = (low / high) ** (1 / seconds)
    down = [(float(t), high * ratio**t) for t in range(seconds + 1)]
    up = [(float(seconds + t), low / ratio**t) for t in range(1, seconds + 1)]
    return down + up


TRACES: dict[str, common_pb2.NetworkProfile] = {
    p.name: p
    for p in (
        _rate_trace("handover-5g-4g", [(0, 100e6), (20, 12.5e6), (40, 100e6)], period_s=60),
        _rate_trace("blackout-500ms", [(0, 50e6), (9.5, MIN_RATE_BPS)], period_s=10),
        _rate_trace("slow-fade", _fade(100e6, 5e6, 20), period_s=41),
        _rate_trace("step-50-5-50", [(0, 50e6), (2, 5e6), (4, 50e6)]),
    )
}
PROFILES.update(TRACES)
