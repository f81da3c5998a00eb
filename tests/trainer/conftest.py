"""Fixtures shared by the trainer tests."""

import pytest


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps process-wide state; each in-process run starts from none."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)
