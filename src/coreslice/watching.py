"""What ``coreslice watch`` does about each slice: a pure function of what it saw before, what
``coreslice status`` says now, and the time.

A slice whose state is ``panicked`` or ``halted`` and whose ``on_crash`` is ``restart`` is
restarted, at most ``max_restarts`` times in any ``window_s`` seconds (each attempt counts,
whether it succeeds or not); then the watcher stops restarting it, says why once, and starts
again, with a fresh budget, only after the slice was seen running (restarted by hand).  Other states (launching,
running, stopped, failed, unknown) are only logged when they change.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

CRASHED = ("panicked", "halted")


@dataclass(frozen=True)
class Policy:
    max_restarts: int = 3
    window_s: float = 600.0

    def describe(self) -> str:
        minutes = self.window_s / 60
        return f"{self.max_restarts} restart{'s' * (self.max_restarts != 1)} in {minutes:g} min"


@dataclass(frozen=True)
class Seen:
    """What the watcher remembers of one slice."""

    state: str | None = None
    restarts: tuple[float, ...] = ()   # times of restart attempts within the window
    gave_up: bool = False


@dataclass(frozen=True)
class Event:
    """One line of the watcher's log."""

    kind: str        # state | restart | restarted | restart-failed | gave-up | gone | status-failed | status-ok | started | stopped
    message: str
    slice: str | None = None
    state: str | None = None

    def to_json(self, now: float) -> dict:
        return {"time": round(now, 3), "time_iso": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now)),
                "event": self.kind, "slice": self.slice, "state": self.state, "message": self.message}


@dataclass(frozen=True)
class Step:
    seen: dict[str, Seen]
    events: list[Event] = field(default_factory=list)
    restart: list[str] = field(default_factory=list)   # names to run `coreslice restart` for, in order


def decide(seen: dict[str, Seen], slices: list[dict], now: float, policy: Policy) -> Step:
    """The next step, from ``seen`` (the previous step's) and ``slices`` (status's list)."""
    out: dict[str, Seen] = {}
    events: list[Event] = []
    restart: list[str] = []
    for s in slices:
        name, state = s.get("name"), s.get("state")
        if not isinstance(name, str):
            continue
        before = seen.get(name, Seen())
        recent = tuple(t for t in before.restarts if now - t < policy.window_s)
        now_seen = replace(before, state=state, restarts=recent)
        reason = s.get("reason")
        why = f" ({reason})" if reason else ""
        if state != before.state:
            change = f"{before.state} -> {state}" if before.state is not None else f"{state}"
            extra = ""
            if state in CRASHED and s.get("on_crash") != "restart":
                extra = f"; on-crash is {s.get('on_crash') or 'none'}: left as it is"
            events.append(Event("state", f"{name}: {change}{why}{extra}", name, state))
        if state == "running" and now_seen.gave_up:
            # Someone got it going again by hand: watch it anew, with a fresh restart budget (a
            # slice our own restarts keep running keeps its history: a crash loop stays bounded).
            now_seen = replace(now_seen, gave_up=False, restarts=())
        if state in CRASHED and s.get("on_crash") == "restart":
            if len(recent) >= policy.max_restarts:
                if not now_seen.gave_up:
                    events.append(Event("gave-up", f"{name}: not restarting it: {len(recent)} restart"
                                        f"{'s' * (len(recent) != 1)} in the last {policy.window_s / 60:g} min "
                                        f"(at most {policy.describe()}); it stays {state}: look at its log "
                                        f"(coreslice console {name}), then coreslice restart {name}", name, state))
                    now_seen = replace(now_seen, gave_up=True)
            else:
                n = len(recent) + 1
                events.append(Event("restart", f"{name}: {state}{why}: restarting it (attempt {n} of at most "
                                    f"{policy.describe()})", name, state))
                now_seen = replace(now_seen, restarts=recent + (now,))
                restart.append(name)
        out[name] = now_seen
    for name, before in seen.items():
        if name not in out:
            events.append(Event("gone", f"{name}: no longer listed by coreslice status (was {before.state})", name))
    return Step(out, events, restart)


def restarted(name: str, ok: bool, detail: str | None) -> Event:
    """The line for one `coreslice restart` that ran."""
    if ok:
        return Event("restarted", f"{name}: restarted" + (f": {detail}" if detail else ""), name)
    return Event("restart-failed", f"{name}: restart failed: {detail or 'no reason given'}", name)
