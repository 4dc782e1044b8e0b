"""The chat node's fair line: people wait here, in turn, for one of the model's slots.

Why here and not in the gateway's FIFO queue: the gateway cannot tell people apart (every request comes with
the chat node's certificate), so one person's burst of messages, or one app's loop, would queue ahead of
everyone else, and its queue answers 429 after `queue_timeout_s`. The chat node knows who asks, so it sends at
most `capacity` requests to the gateway (its slots) and lets the rest wait here, served round-robin between
people: the next slot goes to the person served least recently (a newcomer first), so with capacity 1 a person
who fired 20 messages gets every other turn, and someone who sends one message waits for at most the answer
in progress. A waiting person sees their place and an estimate, and can
cancel. docs/waiting.md tells who waits where.

All on one event loop (no locks). `capacity` can change at any time (the gateway reports its slots).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import math
import time
from dataclasses import dataclass, field

PRIOR_SERVICE_S = None  # no estimate until an answer has been measured
SERVICE_SAMPLES = 32


class LineClosed(Exception):
    """The wait ended without a slot: `reason` says why (the model is down, the wait was too long, cancelled)."""

    def __init__(self, reason: str, kind: str):
        super().__init__(reason)
        self.reason, self.kind = reason, kind  # kind: down | timeout | cancelled


@dataclass(eq=False)
class Ticket:
    """One message waiting for (or holding) a slot."""

    person: str
    number: int
    joined: float
    admitted_at: float | None = None
    closed: LineClosed | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def admitted(self) -> bool:
        return self.admitted_at is not None

    @property
    def waited_s(self) -> float:
        return (self.admitted_at if self.admitted_at is not None else time.monotonic()) - self.joined


class FairQueue:
    def __init__(self, capacity: int, clock=time.monotonic):
        self._clock = clock
        self._capacity = max(1, int(capacity))
        self._lines: dict[str, collections.deque[Ticket]] = {}
        self._last_served: dict[str, float] = {}  # people waiting or holding a slot: when their last slot began
        self._holding: set[Ticket] = set()
        self._numbers = itertools.count(1)
        self._service_s: collections.deque[float] = collections.deque(maxlen=SERVICE_SAMPLES)
        self._cut_short_s: collections.deque[float] = collections.deque(maxlen=SERVICE_SAMPLES)  # stopped, fell back
        self.served = 0
        self.waited = 0  # tickets that had to wait before their slot

    # -- state -------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._capacity

    @capacity.setter
    def capacity(self, value: int) -> None:
        self._capacity = max(1, int(value))
        self._hand_off()

    @property
    def active(self) -> int:
        return len(self._holding)

    @property
    def waiting(self) -> int:
        return sum(len(line) for line in self._lines.values())

    def snapshot(self) -> dict:
        return {"capacity": self._capacity, "active": self.active, "waiting": self.waiting,
                "people_waiting": len(self._lines), "service_s": self.service_s}

    @property
    def service_s(self) -> float | None:
        """Median time a whole answer held a slot, over the last SERVICE_SAMPLES; before the first whole one, the
        longest answer cut short (a lower bound, better than no estimate); None before any."""
        if not self._service_s:
            return round(max(self._cut_short_s), 3) if self._cut_short_s else PRIOR_SERVICE_S
        ordered = sorted(self._service_s)
        return round(ordered[len(ordered) // 2], 3)

    # -- joining and leaving -------------------------------------------------------------------

    def join(self, person: str) -> Ticket:
        """A place in line for `person`; admitted at once when a slot is free and nobody waits."""
        ticket = Ticket(person, next(self._numbers), self._clock())
        if self.active < self._capacity and not self._lines:
            self._admit(ticket)
            self._forget_idle()
        else:
            self._lines.setdefault(person, collections.deque()).append(ticket)
            self.waited += 1
        return ticket

    def leave(self, ticket: Ticket, measured: bool = True) -> None:
        """The ticket is done (answered, failed or cancelled): its slot or its place goes to the next in turn.
        measured=False: its time says nothing about how long an answer takes (stopped, fell back), so the
        estimates use it only while no whole answer was measured."""
        if ticket in self._holding:
            self._holding.discard(ticket)
            (self._service_s if measured else self._cut_short_s).append(self._clock() - ticket.admitted_at)
            self.served += 1
            self._hand_off()
        elif self._remove(ticket):
            self._forget_idle()
            self._notify_all()

    def close_all(self, reason: str, kind: str = "down") -> int:
        """End every wait with `reason` (the model is down: nobody should wait for it). Returns how many."""
        closed = 0
        for line in self._lines.values():
            for ticket in line:
                ticket.closed = LineClosed(reason, kind)
                ticket.changed.set()
                closed += 1
        self._lines.clear()
        self._forget_idle()
        return closed

    async def wait(self, ticket: Ticket, timeout_s: float) -> bool:
        """Wait until the ticket is admitted (True) or something about its place changed (False), at most
        timeout_s. Raises LineClosed if the line was closed for it."""
        if ticket.closed is not None:
            raise ticket.closed
        if ticket.admitted:
            return True
        ticket.changed.clear()
        try:
            await asyncio.wait_for(ticket.changed.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass
        if ticket.closed is not None:
            raise ticket.closed
        return ticket.admitted

    def place(self, ticket: Ticket) -> dict:
        """Where the ticket stands: how many are served before it, and an estimate of the wait."""
        ahead = self.ahead_of(ticket)
        service = self.service_s
        estimate = None
        if service is not None:
            # the next slot frees when the oldest answer in progress ends; then one per service time / slots
            running = [self._clock() - t.admitted_at for t in self._holding]
            # (an answer already running longer than usual is taken to need a tenth of a usual one more)
            first = max(service / 10, service - max(running)) if running and self.active >= self._capacity else 0.0
            estimate = round(first + service * math.floor(ahead / self._capacity), 1)
        return {"position": ahead + 1, "ahead": ahead, "estimate_s": estimate, "waited_s": round(ticket.waited_s, 1)}

    def ahead_of(self, ticket: Ticket) -> int:
        """Tickets served before this one, round-robin: each person with messages waiting gets one turn a round,
        in the order they got in line."""
        line = self._lines.get(ticket.person)
        if line is None or ticket not in line:
            return 0
        index = list(line).index(ticket)
        ring = self._ring()
        mine = ring.index(ticket.person)
        ahead = index  # this person's own earlier messages
        for turn, person in enumerate(ring):
            if person != ticket.person:
                # every round before this ticket's round, plus this round for those whose turn comes first
                ahead += min(len(self._lines[person]), index + (1 if turn < mine else 0))
        return ahead

    def _ring(self) -> list[str]:
        """People with messages waiting, in turn order: least recently served first (never served: -inf), ties
        by who got in line first. Whoever is served goes to the back, so later rounds keep this order."""
        return sorted(self._lines, key=lambda p: (self._last_served.get(p, -math.inf), self._lines[p][0].joined,
                                                  self._lines[p][0].number))

    # -- inside -------------------------------------------------------------------------------

    def _admit(self, ticket: Ticket) -> None:
        ticket.admitted_at = self._clock()
        self._last_served[ticket.person] = ticket.admitted_at
        self._holding.add(ticket)
        ticket.changed.set()

    def _remove(self, ticket: Ticket) -> bool:
        line = self._lines.get(ticket.person)
        if line is None or ticket not in line:
            return False
        line.remove(ticket)
        if not line:
            del self._lines[ticket.person]
        return True

    def _hand_off(self) -> None:
        """Free slots go to the person whose turn it is (the front of the ring), who then goes to its back."""
        moved = False
        while self.active < self._capacity and self._lines:
            person = self._ring()[0]
            line = self._lines[person]
            ticket = line.popleft()
            if not line:
                del self._lines[person]
            self._admit(ticket)
            moved = True
        self._forget_idle()
        if moved:
            self._notify_all()

    def _forget_idle(self) -> None:
        """Someone neither waiting nor holding a slot starts afresh next time (bounded memory)."""
        present = set(self._lines) | {t.person for t in self._holding}
        for person in [p for p in self._last_served if p not in present]:
            del self._last_served[person]

    def _notify_all(self) -> None:
        for line in self._lines.values():
            for ticket in line:
                ticket.changed.set()
