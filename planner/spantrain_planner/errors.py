"""User-facing planning errors.

Role: the exceptions the planner raises when its *input* cannot be satisfied (as opposed to
internal invariants, which are ``assert``). Every message names the numbers involved and the
knob a user can turn. Imported by every planner pass; imports nothing from the project.
"""

from __future__ import annotations


class PlanningError(ValueError):
    """An input the planner cannot honour; the message says which knob to turn."""


class InputError(PlanningError):
    """A cluster, model profile or option is malformed or inconsistent."""


class InfeasibleError(PlanningError):
    """No plan fits the devices' memory (or no device is usable at all)."""

    def __init__(
        self,
        message: str,
        *,
        device_id: str | None = None,
        needed_bytes: int | None = None,
        available_bytes: int | None = None,
    ) -> None:
        super().__init__(message)
        self.device_id = device_id
        self.needed_bytes = needed_bytes
        self.available_bytes = available_bytes


def gib(num_bytes: float) -> str:
    """Format bytes as GiB with two decimals (for messages)."""
    return f"{num_bytes / 2**30:.2f} GiB"
