"""The checker's model: what every slot may read as, and the promises checked against it.

For each slot the model keeps the newest acknowledged page and every page a
read may still return (a write that failed or was cut off by the agent's death
may or may not have landed: Jepsen's indeterminate operations). A read must
return one of those (P1): never an older acknowledged page, another slot's page,
or zeros for a written slot. Zeros are fine after a trim (NBD leaves a trimmed
range's contents to the server, and so may an older page of the slot after a
restart: the kernel never reads a slot it trimmed).

P6 (nonces): every (slot, generation) the agent writes names exactly one page.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from netswap.protocol import PAGE_SIZE


def page_of(content: int, length: int = PAGE_SIZE) -> bytes:
    """A payload that says which write made it (content ids are never reused), of one
    of the lengths the agent's payloads take (whole, a compressed size, same-filled)."""
    return content.to_bytes(8, "little") * (length // 8)


def content_of(page: bytes | memoryview) -> int:
    """The write a payload came from; -1 if it is none any write made (torn, mixed)."""
    head = bytes(page[:8])
    if len(page) % 8 or bytes(page) != head * (len(page) // 8):
        return -1
    return int.from_bytes(head, "little")


@dataclass
class SlotModel:
    acked: int = 0  # content of the newest acknowledged write, 0 never written
    possible: set[int] = field(default_factory=set)
    trimmed: bool = False
    ever: set[int] = field(default_factory=set)  # every content ever written here
    doubt: bool = False  # its last write failed: EIO until written again (the kernel
    # keeps a page whose swap write failed and writes it again; it never reads the slot)


class Model:
    def __init__(self, slots: int) -> None:
        self.slots = [SlotModel() for _ in range(slots)]
        self.violations: list[str] = []
        self.nonces: dict[tuple[int, int], int] = {}
        self.reads_ok = self.reads_eio = self.writes_ok = self.writes_failed = 0

    def issued(self, slot: int, content: int, generation: int) -> None:
        s = self.slots[slot]
        s.ever.add(content)
        s.possible.add(content)
        key = (slot, generation)
        if self.nonces.setdefault(key, content) != content:
            self.violations.append(f"P6: slot {slot} generation {generation:#x} sealed two "
                                   f"pages ({self.nonces[key]} and {content})")  # fmt: skip

    def acked(self, slot: int, content: int) -> None:
        s = self.slots[slot]
        s.acked, s.possible, s.trimmed, s.doubt = content, {content}, False, False
        self.writes_ok += 1

    def failed(self, slot: int, content: int) -> None:
        self.writes_failed += 1  # it stays possible: it may have landed
        self.slots[slot].doubt = True

    def trimmed(self, slot: int) -> None:
        s = self.slots[slot]
        s.trimmed = True

    def read(self, slot: int, got: int | None, when: str) -> None:
        """got: the content read, 0 for zeros, None for EIO."""
        if got is None:
            self.reads_eio += 1
            return
        self.reads_ok += 1
        s = self.slots[slot]
        if got == 0:
            if s.acked and not s.trimmed:
                self.violations.append(f"P1: slot {slot} read zeros, its newest acknowledged "
                                       f"page is {s.acked} ({when})")  # fmt: skip
            return
        if got in s.possible:
            return
        if s.trimmed and got in s.ever:
            return
        what = ("an older page" if got in s.ever else
                "no page of this slot" if got > 0 else "a torn page")  # fmt: skip
        self.violations.append(f"P1: slot {slot} read {got} ({what}); newest acknowledged "
                               f"{s.acked}, possible {sorted(s.possible)} ({when})")  # fmt: skip
