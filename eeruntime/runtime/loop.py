"""The stage loop, written once (see docs/design.md, "The stage loop").

Every executor (eager ops, the fused CPU ops, CUDA graphs) runs a batch through this loop; they
differ in how a step runs, never in what it does.
"""

from __future__ import annotations

from typing import List


def run_stages(batch, num_exits: int) -> List[int]:
    """Run ``batch`` (an executor's pass over one batch) stage by stage: run stage k and exit k on
    the rows still alive, decide, scatter the leavers into the output, pack the survivors; stop
    when none are left. Returns how many rows left at each exit."""
    counts = [0] * num_exits
    alive = batch.alive
    for k in range(num_exits):
        left = batch.step(k)  # stage k, exit k, decision, leavers written to the output
        counts[k] = left
        alive -= left
        if alive == 0 or k == num_exits - 1:
            break
        if left:
            batch.pack()  # the survivors' state, ids and carry, dense, for stage k + 1
    return counts
