"""Steps the job declares complete: which step every rank holds visible on its node, agreed on the
all-reduce `should_save` makes anyway, and told to each rank's daemon (`declare_complete`).

A node of a large cluster learns that a step is complete only once its probes have seen a holder of
every rank, which takes up to n/(2(k+1)) heartbeat rounds; until then its retention keeps every newer
step. The ranks know sooner. Each round, every rank reports the newest step it holds visible and
whether it holds the previous round's candidate (the smallest of those newest steps). When every
rank holds the candidate, the candidate is declared complete. A rank whose save of that step failed
holds a newer step but not the candidate, so the candidate is not declared.
"""

from __future__ import annotations

import time

from .errors import NotFoundError, TierckptError, unsupported_request

ASK_EVERY_S = 0.1  # how often a rank asks its daemon which of its steps are visible, at most


class Completion:
    """One rank's part (of the Checkpointer `ck`): what it holds visible, and the declarations to
    its daemon."""

    def __init__(self):
        self.visible: set = set()  # steps whose shard of this rank the daemon showed visible
        self.candidate = -1  # the newest step every rank held visible, as of the last round
        self.declared = -1
        self.supported = True
        self._asked = float("-inf")

    def local(self, ck) -> list:
        """[the newest step this rank holds visible, 1 if it lacks the candidate], for the all-reduce
        (the first negated: a max over ranks gives the smallest)."""
        stale = ck._last_save_step is not None and ck._last_save_step not in self.visible
        if self.supported and stale and time.monotonic() - self._asked >= ASK_EVERY_S:
            self._asked = time.monotonic()
            try:
                steps = ck._client.list_steps(ck.namespace)
                self.visible = {s["step"] for s in steps if ck.rank in s.get("ranks", ())}
            except TierckptError:
                pass
        return [-float(max(self.visible, default=-1)), 0.0 if self.candidate in self.visible else 1.0]

    def agreed(self, ck, reduced: list) -> None:
        """Acts on the all-reduced `local()`: declares the candidate if every rank holds it."""
        newest_everywhere, lacking = int(-reduced[0]), reduced[1] > 0
        if not lacking and self.candidate != self.declared:  # (after a rollback a lower step comes again)
            self.declared = self.candidate
            try:
                ck._client.declare_complete(ck.namespace, self.candidate)
            except NotFoundError:
                pass  # dropped here meanwhile: nothing to settle
            except TierckptError as e:
                if unsupported_request(e):
                    self.supported = False  # an older daemon
        self.candidate = newest_everywhere
