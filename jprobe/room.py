"""Planning in the room an applier makes: planned again, in room made for it, until a plan fits.

Where the trampolines land decides some jumps' bytes, and so which short sites get a pun,
which changes a plan's size a little: no applier can size its room exactly before it plans.
Each says only where room can be for a plan of a given size; the loop and its error are here.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .chooser import Policy
from .elf import ElfModule
from .errors import JprobeError
from .plan import ModulePlan
from .planner import ResolvedProbe, build_plan

# A draft, the plan, the plan again in room of another kind (a file applier's unpacked
# segments), and once more in room made for a plan that outgrew its own: past that, the
# room an applier makes does not follow the plans it is made for.
TRIES = 4


@dataclass(frozen=True)
class Room:
    """Where an applier puts a plan's trampolines (text) and probe table (data), and where
    each must end; without ends, a draft's room: that plan only sizes the next room."""
    text_vaddr: int
    data_vaddr: int | Callable[[int], int]      # or where the table goes past trampolines of a size
    text_end: int | None = None
    data_end: int | None = None
    reach: int | None = None                    # how far past the image they may reach (build_plan's room)
    # The applier's last word on a plan that fits: the plan as it writes it, or None to be
    # asked for room for the same size again.
    keep: Callable[[ModulePlan], ModulePlan | None] | None = None

    def holds(self, plan: ModulePlan) -> bool:
        return (self.text_end is not None and self.data_end is not None
                and plan.text_vaddr + len(plan.text) <= self.text_end
                and plan.data_vaddr + len(plan.data) <= self.data_end)


# Room for a plan the size of the one given (None: before any plan), or None where no room can be.
RoomFor = Callable[[ModulePlan | None], Room | None]


def plan_in_room(module: ElfModule, probes: list[ResolvedProbe], room_for: RoomFor,
                 policy: Policy = Policy()) -> ModulePlan:
    """The plan of `probes` in room `room_for` makes, asked again for room for each plan that
    outgrew its own, as the applier's `policy` allows."""
    sized_by = None
    for _ in range(TRIES):
        room = room_for(sized_by)
        if room is None:
            break
        plan = build_plan(module, probes, room.text_vaddr, room.data_vaddr, policy, room.reach)
        if not room.holds(plan):
            sized_by = plan
            continue
        kept = plan if room.keep is None else room.keep(plan)
        if kept is not None:
            return kept
    raise JprobeError(f"{module.path}: internal error: the trampolines and probe table outgrew the room "
                      f"made for them; please report it")
