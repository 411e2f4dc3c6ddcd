"""The patch plan: a plain, serialisable description of everything an applier writes.

A plan says, for one module, which bytes change at which probe sites, and the
contents and link-time addresses of the two added regions (trampoline code and
probe data). Appliers (a file with LIEF, a process with the C runtime or with
ptrace) apply it without knowing any x86. A plan, once made, stays as it is: what changes
it (a packed form, a re-aimed jump) makes a new one instead.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from .mechanisms import Mechanism


@dataclass(frozen=True)
class ProbePlan:
    spec: str
    address: int
    mechanism: Mechanism
    reason: str
    handler: str
    original: bytes
    patched: bytes
    trampoline: int | None = None
    resume: int | None = None
    patch_fixup: int | None = None     # offset in `patched` of the rel32 that reaches the trampoline
    target: str = ""                   # the spec without its handler, as reports name the probe
    islands: list[int] = field(default_factory=list)   # pun / evict: where its hops are
    depends: int | None = None         # the probe site whose patched bytes this jump's rel32 reads
    # (original instruction start, link-time address of its relocated copy in the text) for
    # every copy the trampoline holds, sorted: where an applier moves a thread stopped at one
    # of them while it patches or unpatches the site (planner._boundaries says which).
    boundaries: list[tuple[int, int]] = field(default_factory=list)


@dataclass(frozen=True)
class ModulePlan:
    module: str
    build_id: str | None
    text_vaddr: int
    text: bytes
    data_vaddr: int
    data: bytes
    probes: list[ProbePlan] = field(default_factory=list)
    # Offsets in `text` of the int32 fields that reach the module itself (not the added
    # regions): an applier that places text elsewhere than text_vaddr adjusts them.
    text_fixups: list[int] = field(default_factory=list)
    # What a file applier writes instead of text and data when the runtime unpacks them
    # (packing.py); empty when they are written as they are.
    packed: bytes = b""

    def to_json(self) -> str:
        def encode(value):
            if isinstance(value, bytes):
                return value.hex()
            if isinstance(value, dict):
                return {k: encode(v) for k, v in value.items()}
            if isinstance(value, list):
                return [encode(v) for v in value]
            return value
        return json.dumps(encode(asdict(self)), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "ModulePlan":
        raw = json.loads(text)
        probes = [ProbePlan(**{**p, "mechanism": Mechanism(p["mechanism"]), "original": bytes.fromhex(p["original"]), "patched": bytes.fromhex(p["patched"]),
                               "boundaries": [tuple(pair) for pair in p.get("boundaries", [])]})
                  for p in raw.pop("probes")]
        return cls(**{**raw, "text": bytes.fromhex(raw["text"]), "data": bytes.fromhex(raw["data"]),
                      "packed": bytes.fromhex(raw.get("packed", ""))}, probes=probes)
