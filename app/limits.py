"""Admission limits: open streams per process and per session.

Checking a limit and taking a place under it are one synchronous step
(`Admission.try_reserve`): with a checkpoint between them, a burst of concurrent
requests all pass the check before any of them is counted.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

# Where the watch route leaves its slot for `release_request_slot` (an ASGI scope key).
SCOPE_KEY = "chatwatch.slot"


class Slot:
    """One place under the limits; `release` gives it back, once, however often called."""

    __slots__ = ("_admission", "owner")

    def __init__(self, admission: Admission, owner: str | None) -> None:
        self._admission: Admission | None = admission
        self.owner = owner

    def release(self) -> None:
        admission, self._admission = self._admission, None
        if admission is not None:
            admission._release(self.owner)

    @property
    def released(self) -> bool:
        return self._admission is None


class Admission:
    """Counts open streams against `max_total` and `max_per_owner` (a session)."""

    def __init__(self, max_total: int, max_per_owner: int) -> None:
        self._max_total = max_total
        self._max_per_owner = max_per_owner
        self._per_owner: dict[str, int] = {}
        self.total = 0

    def of(self, owner: str) -> int:
        return self._per_owner.get(owner, 0)

    def try_reserve(self, owner: str | None) -> Slot | None:
        """A slot if both limits allow one more stream, else None (sync: no checkpoint)."""
        if self.total >= self._max_total:
            return None
        if owner is not None:
            held = self._per_owner.get(owner, 0)
            if held >= self._max_per_owner:
                return None
            self._per_owner[owner] = held + 1
        self.total += 1
        return Slot(self, owner)

    def _release(self, owner: str | None) -> None:
        self.total -= 1
        if owner is not None:
            left = self._per_owner[owner] - 1
            if left:
                self._per_owner[owner] = left
            else:
                del self._per_owner[owner]


def hold_for_request(scope: MutableMapping[str, Any], slot: Slot) -> None:
    """Tie `slot` to the request: `release_request_slot` frees it when the request ends.

    The response body releases it earlier when it runs; this covers a body that never
    runs (the client left while the response head was being sent).
    """
    scope[SCOPE_KEY] = slot


def release_request_slot(scope: MutableMapping[str, Any]) -> None:
    slot = scope.pop(SCOPE_KEY, None)
    if isinstance(slot, Slot):
        slot.release()
