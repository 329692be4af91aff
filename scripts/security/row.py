"""One line of the attack matrix: what was tried, what must happen, what did happen."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    area: str
    """`broker`, `http`, `fleet`, `bundle`, …: the module that ran it."""
    attack: str
    """What the attacker did, in a few words (`unsigned drain on fleet/dev-1/cmd`)."""
    expected: str
    """What must happen (`refused ack, reason names the missing signature`)."""
    observed: str
    """What did happen, measured in this run (the ack's reason, the HTTP status, …)."""
    held: bool
    """True when the device kept running the bundle it ran, trusted what it trusted, and
    reported the refusal with a reason — the bar every row must meet."""
