"""Busy-time bandwidth accounting and the rate-limited summary line."""

from tier_helpers import make_prompt

from sgl_kvtier.tier.stats import BusyClock, SummaryLog


def test_busy_clock_counts_overlapping_work_once():
    now = [0.0]
    clock = BusyClock(clock=lambda: now[0])
    with clock:
        now[0] = 1.0
        with clock:  # a second read overlapping the first adds no time
            now[0] = 2.0
        now[0] = 3.0
    now[0] = 10.0  # idle time is not busy time
    with clock:
        now[0] = 11.0
    assert clock.seconds == 4.0


def _stats(**activity):
    base = {"hits": 0, "misses": 0, "bytes_read": 0, "bytes_written": 0, "write_drops": 0,
            "write_errors": 0, "admission_refusals": 0, "checksum_failures": 0,
            "corrupt_files": 0, "untrusted_files": 0, "used_bytes": 0, "capacity_bytes": 1,
            "read_bandwidth": 0.0}
    return lambda: {**base, **activity}


def test_summary_at_most_once_per_interval_and_only_after_activity(tier_log):
    now = [0.0]
    summary = SummaryLog(interval=60, clock=lambda: now[0])
    assert not summary.maybe_log(_stats(hits=1))  # too soon after start
    now[0] = 61
    assert summary.maybe_log(_stats(hits=1))
    now[0] = 62
    assert not summary.maybe_log(_stats(hits=5))  # too soon after the last line
    now[0] = 130
    assert summary.maybe_log(_stats(hits=5))
    now[0] = 500
    assert not summary.maybe_log(_stats(hits=5))  # nothing happened since
    lines = [r.getMessage() for r in tier_log.records]
    assert len(lines) == 2 and "4 hits" in lines[1]


def test_store_summary(open_store, tier_log):
    store = open_store(summary_interval=0.0)
    assert not store.maybe_log_summary()
    prompt = make_prompt(2)
    prompt.put(store)
    store.flush(10)
    store.load(prompt.keys)
    assert store.maybe_log_summary()
    assert not store.maybe_log_summary()
    assert "2 hits" in tier_log.records[-1].getMessage()
