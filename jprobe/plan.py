"""The patch plan: a plain, serialisable description of everything an applier writes.

A plan says, for one module, which bytes change at which probe sites, and the
contents and link-time addresses of the two added regions (trampoline code and
probe data). Appliers (a file with LIEF, a process with the C runtime or with
ptrace) apply it without knowing any x86. A plan, once made, stays as it is: what changes
it (a packed form, a re-aimed jump) makes a new one instead.
"""
from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field, replace

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

    def moved(self, delta: int) -> "ModulePlan":
        """The plan with its trampolines and table `delta` bytes away from where it was made,
        as an applier that finds room elsewhere writes it: the text's references to the
        module lose `delta`, the sites' jumps to the text gain it. (The table's own address
        fields stay as planned: only the runtime reads them, and it moves plans itself.)"""
        text = bytearray(self.text)
        for off in self.text_fixups:
            _add32(text, off, -delta, self.module)
        probes = []
        for p in self.probes:
            patched = bytearray(p.patched)
            if p.patch_fixup is not None:
                _add32(patched, p.patch_fixup, delta, self.module)
            probes.append(replace(p, patched=bytes(patched),
                                  trampoline=None if p.trampoline is None else p.trampoline + delta,
                                  boundaries=[(orig, copy + delta) for orig, copy in p.boundaries]))
        return replace(self, text=bytes(text), text_vaddr=self.text_vaddr + delta,
                       data_vaddr=self.data_vaddr + delta, probes=probes)

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


def _add32(code: bytearray, offset: int, delta: int, module: str) -> None:
    value = struct.unpack_from("<i", code, offset)[0] + delta
    if not -(1 << 31) <= value < 1 << 31:
        raise ValueError(f"{module}: a rel32 at offset {offset:#x} is out of reach once moved")
    struct.pack_into("<i", code, offset, value)
