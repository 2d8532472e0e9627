"""The batching decision alone: plain numbers for the clock and the queue, no gRPC, no loop."""

from __future__ import annotations

import pytest

from tensorgate.server.batching.policy import AdaptiveWindow, StaticWindow

WINDOW = StaticWindow(max_batch_size=8, max_queue_delay_s=0.002, preferred_batch_sizes=(4,))


def test_idle_a_lone_request_waits_out_the_window_from_its_arrival() -> None:
    assert WINDOW.wait_s(1, oldest_enqueued_at=10.0, now=10.0, idle_instances=0) == (
        pytest.approx(0.002)
    )
    assert WINDOW.wait_s(1, oldest_enqueued_at=10.0, now=10.0015, idle_instances=0) == (
        pytest.approx(0.0005)
    )
    assert WINDOW.wait_s(1, oldest_enqueued_at=10.0, now=10.002, idle_instances=0) == 0.0
    assert WINDOW.batch_rows(1) == 8  # it goes with whatever has come


def test_steady_arrivals_go_when_a_preferred_size_is_reached() -> None:
    clock = 5.0
    for rows in (1, 2, 3):
        assert WINDOW.wait_s(rows, 5.0, clock, 0) > 0
        clock += 0.0004  # one arrival every 0.4 ms
    assert WINDOW.wait_s(4, 5.0, clock, 0) == 0.0
    assert WINDOW.batch_rows(4) == 4  # exactly the preferred size, not more


def test_a_burst_fills_the_batch_and_goes_without_waiting() -> None:
    assert WINDOW.wait_s(8, 1.0, 1.0, 0) == 0.0
    assert WINDOW.wait_s(30, 1.0, 1.0, 0) == 0.0
    assert WINDOW.batch_rows(30) == 8


def test_saturated_requests_that_waited_for_an_instance_go_at_once() -> None:
    # The oldest arrived 5 ms ago while every instance was busy: the window has passed.
    assert WINDOW.wait_s(6, oldest_enqueued_at=2.0, now=2.005, idle_instances=0) == 0.0
    assert WINDOW.batch_rows(6) == 8


def test_eager_dispatch_skips_the_window_only_while_another_instance_is_idle() -> None:
    eager = StaticWindow(8, 0.002, eager_dispatch=True)
    assert eager.wait_s(1, 3.0, 3.0, idle_instances=1) == 0.0
    assert eager.wait_s(1, 3.0, 3.0, idle_instances=0) == pytest.approx(0.002)


# --- the adaptive policy ------------------------------------------------------------------------


def _adaptive(gap_s: float, call_s: float = 0.0005, budget_s: float = 0.0) -> AdaptiveWindow:
    """An adaptive policy that has seen 50 arrivals `gap_s` apart and batches costing call_s."""
    policy = AdaptiveWindow(max_batch_size=8, max_queue_delay_s=0.002, latency_budget_s=budget_s)
    for i in range(50):
        policy.arrived(1, 100.0 + i * gap_s)
    for _ in range(50):
        policy.ran(1, call_s)
    return policy


def test_adaptive_sends_a_lone_request_at_once_when_nothing_has_been_learned() -> None:
    fresh = AdaptiveWindow(max_batch_size=8, max_queue_delay_s=0.002)
    assert fresh.wait_s(1, 1.0, 1.0, idle_instances=1) == 0.0


def test_adaptive_idle_arrivals_slower_than_an_engine_call_go_without_a_window() -> None:
    # One caller in a loop: a request every 3 ms, an engine call 0.5 ms.
    policy = _adaptive(gap_s=0.003)
    assert policy.wait_s(1, 1.0, 1.0, idle_instances=1) == 0.0


def test_adaptive_steady_fast_arrivals_wait_for_the_company_expected() -> None:
    # A row every 0.1 ms, an engine call 0.5 ms: waiting fills the batch sooner than the window.
    policy = _adaptive(gap_s=0.0001)
    wait = policy.wait_s(3, 1.0, 1.0, idle_instances=1)
    assert wait == pytest.approx(5 * 0.0001, rel=0.05)  # 5 more rows to a full batch of 8
    # Never past the window, however slowly the batch fills.
    slow_fill = _adaptive(gap_s=0.0004)
    assert slow_fill.wait_s(1, 1.0, 1.0, idle_instances=0) == pytest.approx(0.002)


def test_adaptive_saturated_waits_while_every_other_instance_is_busy() -> None:
    # Rows arrive every 1 ms (slower than a call) but no other instance is free: company is
    # worth waiting for, within the window.
    policy = _adaptive(gap_s=0.001)
    assert policy.wait_s(2, 1.0, 1.0, idle_instances=0) == pytest.approx(0.002)
    assert policy.wait_s(2, 1.0, 1.0, idle_instances=1) == 0.0  # spare capacity: go
    assert policy.wait_s(8, 1.0, 1.0, idle_instances=0) == 0.0  # full: go


def test_adaptive_bursty_goes_when_the_next_row_is_not_expected_in_time() -> None:
    policy = _adaptive(gap_s=0.0001)
    # The oldest has waited 1.95 ms of the 2 ms window: 0.05 ms left, the next row due in 0.1.
    assert policy.wait_s(3, 1.0, 1.00195, idle_instances=0) == 0.0


def test_adaptive_keeps_queue_plus_run_time_within_the_latency_budget() -> None:
    # Budget 1 ms, a batch of 3 costs ~0.5 ms to run: at most ~0.5 ms of waiting.
    policy = _adaptive(gap_s=0.00005, budget_s=0.001)
    wait = policy.wait_s(3, 1.0, 1.0, idle_instances=0)
    assert 0 < wait <= 0.0005 + 1e-9
    assert policy.wait_s(3, 1.0, 1.0006, idle_instances=0) == 0.0  # budget spent


def test_adaptive_learns_the_arrival_rate_as_load_changes() -> None:
    policy = _adaptive(gap_s=0.0001)
    assert policy.wait_s(1, 1.0, 1.0, idle_instances=1) > 0  # busy: waits
    clock = 200.0
    for _ in range(60):  # the load falls to one request every 5 ms
        clock += 0.005
        policy.arrived(1, clock)
    assert policy.wait_s(1, clock, clock, idle_instances=1) == 0.0


def test_adaptive_stops_going_at_once_when_calls_come_back_late() -> None:
    # 3,000 rows a second and an idle instance. While a small batch is back 0.1 ms after it was
    # sent, the server has capacity to spare: go at once. When the event loop falls behind and
    # calls come back 2 ms after they went, each extra batch costs the server that much: wait
    # for company, as the static window would.
    fast = _adaptive(gap_s=0.00033, call_s=0.0001)
    assert fast.wait_s(2, 1.0, 1.0, idle_instances=1) == 0.0
    behind = _adaptive(gap_s=0.00033, call_s=0.0001)
    for _ in range(60):
        behind.ran(2, 0.002)
    # The 6 rows still missing from a batch of 8 are expected within the 2 ms window.
    assert behind.wait_s(2, 1.0, 1.0, idle_instances=1) == pytest.approx(6 * 0.00033, rel=0.05)


def test_a_waiting_batch_is_woken_only_at_a_size_that_can_make_it_go() -> None:
    """Arrivals short of a preferred or full size cannot make a batch go sooner, so the batcher
    is not woken for them; with a latency budget, at the rows whose run time would leave the
    batch less time than it waits for now."""
    static = StaticWindow(max_batch_size=16, max_queue_delay_s=0.002, preferred_batch_sizes=(4, 8))
    assert [static.wake_rows(r, 1.0, 1.002) for r in (1, 4, 5, 8, 9)] == [4, 8, 8, 16, 16]
    adaptive = AdaptiveWindow(max_batch_size=16, max_queue_delay_s=0.002)
    assert adaptive.wake_rows(3, 1.0, 1.002) == 16
    # A budget, but rows not yet seen to cost anything: rows cannot shorten the wait.
    budgeted = AdaptiveWindow(max_batch_size=16, max_queue_delay_s=0.004, latency_budget_s=0.005)
    assert budgeted.wake_rows(3, 1.0, 1.002) == 16
    # 0.5 ms a call and 0.5 ms a row: a batch of n rows may wait until 1.005 - 0.0005 * (n + 1).
    budgeted._call_s, budgeted._row_s, budgeted._gap_s = 0.0005, 0.0005, 0.001
    assert budgeted.wake_rows(3, 1.0, 1.002) == 6  # 5 rows still go by 1.002; 6 must go sooner
    until = 1.0 + budgeted.wait_s(3, 1.0, 1.0, idle_instances=0)
    assert until == pytest.approx(1.003)  # the budget sets the wait ...
    assert budgeted.wake_rows(3, 1.0, until) == 4  # ... so the next row shortens it
