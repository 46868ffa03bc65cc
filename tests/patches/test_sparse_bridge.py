"""The bridge hands a request's offer to the backend only from its conversion step on."""

from sgl_kvtier.patches.sparse_bridge import SparseBridge


class _Manager:
    def finish(self, rid):
        pass


def test_an_offer_waits_for_its_conversion_step():
    link = SparseBridge(_Manager())
    link.offer("r", (1, 2, 3), 3, convert_at=5)
    assert link.take("r", 4) is None  # the first decode step (prompt + 1): not yet
    assert "r" in link.eligible  # ... and the offer is kept for the next step
    offer = link.take("r", 5)
    assert offer is not None and offer.boundary == 3 and "r" not in link.eligible
    assert link.take("r", 6) is None  # taken once
