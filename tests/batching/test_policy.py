"""The batching decision alone: plain numbers for the clock and the queue, no gRPC, no loop."""

from __future__ import annotations

import pytest

from server.batching.policy import StaticWindow

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
