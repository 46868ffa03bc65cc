"""Cake-style bidirectional prefill: compute a cached prefix's front while loading its back.

The core (:mod:`.planner`, :mod:`.executor`, :mod:`.rates`) imports neither SGLang nor
torch; :mod:`.simulate` plays it on a simulated clock.
"""
