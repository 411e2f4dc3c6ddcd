"""The names of how a probe site is patched, as plans, reports and `jprobe sites` print them.

Both are `str` enums: a member is its word wherever it is written out (JSON, text), and
compares equal to it, so a plan read back from JSON and one just made agree.
"""
from __future__ import annotations

from enum import StrEnum


class Mechanism(StrEnum):
    """What the runtime applies at a site (the JP_MECH_* of the probe table)."""

    JUMP = "jump"          # a jump over whole instructions, or a call retargeted
    PUN = "pun"            # a jump whose rel32 runs on into the bytes after it
    EVICT = "evict"        # a pun that moves one or more instructions after the site out too
    TRAP = "trap"          # int3, resuming at an out-of-line copy


class Tactic(StrEnum):
    """How a site's jump fits, in E9Patch's words (a trap has none)."""

    B1 = "B1"              # whole instructions, or a call retargeted
    B2 = "B2"              # punned jump
    T1 = "T1"              # punned jump after redundant prefixes
    T2 = "T2"              # the next instruction(s) evicted; also a pun over a re-aimed jump
    T3 = "T3"              # a nearby longer instruction evicted, reached by a short jump
