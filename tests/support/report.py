"""Reading the JSON report a probed program writes (SPEC section 3)."""
from __future__ import annotations

import json


class Hits(dict):
    """{link-time address: hits}; a missing address fails with a readable message."""

    def __missing__(self, key):
        have = ", ".join(hex(k) for k in sorted(self))
        raise AssertionError(f"the report has no probe at {key:#x} (it has: {have})")


def _address(probe: dict) -> int:
    a = probe["address"]
    return int(a, 16) if isinstance(a, str) else int(a)


def hits_by_address(report: dict) -> Hits:
    """{link-time address: hits}, summed over the probes at one address."""
    out = Hits()
    for p in report["probes"]:
        addr = _address(p)
        out[addr] = out.get(addr, 0) + int(p["hits"])
    return out


def probe_entry(report: dict, address: int) -> dict:
    for p in report["probes"]:
        if _address(p) == address:
            return p
    raise AssertionError(f"no probe at {address:#x} in report: {json.dumps(report)[:2000]}")
