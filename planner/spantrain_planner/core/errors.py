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

    def __reduce__(self) -> tuple[object, ...]:
        # keyword-only fields survive pickling (the operator plans in other processes)
        return (_infeasible, (str(self), self.device_id, self.needed_bytes,
                              self.available_bytes))


def _infeasible(
    message: str, device_id: str | None, needed: int | None, available: int | None
) -> InfeasibleError:
    return InfeasibleError(
        message, device_id=device_id, needed_bytes=needed, available_bytes=available
    )


def gib(num_bytes: float) -> str:
    """Format bytes as GiB with two decimals (for messages)."""
    return f"{num_bytes / 2**30:.2f} GiB"


class PlanTimeoutError(PlanningError):
    """The search's time budget ran out before any plan that fits was found."""
