"""The quickstart's loss plot: Prometheus samples joined into (step, loss) points."""

from __future__ import annotations

import pytest

from localcluster.quickstart import by_step


@pytest.mark.parametrize(
    ("values", "steps", "expected"),
    [
        # A loss held over several scrapes of one step counts once, as its last sample.
        ([(0, 5.0), (2, 5.0), (4, 4.0)], [(0, 10), (2, 10), (4, 20)], [(10, 5.0), (20, 4.0)]),
        # A loss sampled when no step was scraped has no x position and is left out.
        ([(0, 5.0), (2, 4.5)], [(2, 30)], [(30, 4.5)]),
        # Points come out in step order, not time order (a restarted pod reports lower steps again).
        ([(0, 3.0), (2, 2.0)], [(0, 40), (2, 20)], [(20, 2.0), (40, 3.0)]),
        ([], [(0, 1)], []),
    ],
)
def test_loss_points_are_placed_at_their_step(
    values: list[tuple[float, float]], steps: list[tuple[float, float]], expected: list[tuple[int, float]]
) -> None:
    assert by_step(values, steps) == expected
