"""The batching policy: how long a batch may wait and how big it may grow.

Pure code: inputs are the reserve's occupancy and the host's Pressure, the
output a Decision with a reason; the agent counts every decision by reason for
the dashboard. The rule follows from the reserve: pages waiting in a batch are
pages the kernel cannot reclaim yet, so as the reserve fills or the host nears
its watermarks, batches shrink and go out sooner -- at the extreme, at once.

  state      when                                           batch   linger
  calm       otherwise                                      full    base
  busy       reserve >= 50 %, or PSI some avg10 >= 10 %     1/2     base/4
  urgent     reserve >= 75 %, or MemAvailable < low wmark,  1/4     0 (send now)
             or PSI full avg10 >= 5 %
"""

from __future__ import annotations

from dataclasses import dataclass

from netswap.protocol import MAX_BATCH_PAGES
from netswap.server.ops.pressure import Pressure

BUSY_RESERVE = 0.50
URGENT_RESERVE = 0.75
BUSY_PSI_SOME = 10.0
URGENT_PSI_FULL = 5.0
REASONS = ("calm", "reserve_busy", "psi_busy", "reserve_urgent", "watermark_urgent", "psi_urgent")


@dataclass(frozen=True)
class Decision:
    max_pages: int
    linger_s: float
    reason: str

    @property
    def send_now(self) -> bool:
        return self.linger_s == 0


@dataclass(frozen=True)
class BatchPolicy:
    max_pages: int = 64
    linger_s: float = 200e-6

    def __post_init__(self) -> None:
        if not 1 <= self.max_pages <= MAX_BATCH_PAGES:
            raise ValueError(f"max_pages must be 1..{MAX_BATCH_PAGES}")
        if self.linger_s < 0:
            raise ValueError("linger must be >= 0")

    def decide(self, reserve_occupancy: float, pressure: Pressure) -> Decision:
        reason = self._urgent(reserve_occupancy, pressure)
        if reason:
            return Decision(max(1, self.max_pages // 4), 0.0, reason)
        if reserve_occupancy >= BUSY_RESERVE:
            return Decision(max(1, self.max_pages // 2), self.linger_s / 4, "reserve_busy")
        if pressure.psi_some_avg10 >= BUSY_PSI_SOME:
            return Decision(max(1, self.max_pages // 2), self.linger_s / 4, "psi_busy")
        return Decision(self.max_pages, self.linger_s, "calm")

    @staticmethod
    def _urgent(occupancy: float, p: Pressure) -> str:
        if occupancy >= URGENT_RESERVE:
            return "reserve_urgent"
        if p.watermark_low_kb and p.mem_available_kb < p.watermark_low_kb:
            return "watermark_urgent"
        if p.psi_full_avg10 >= URGENT_PSI_FULL:
            return "psi_urgent"
        return ""
