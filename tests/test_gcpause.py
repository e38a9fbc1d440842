"""The collector pause is reentrant and restores the collector as it found it."""

from __future__ import annotations

import gc

from replicator.gcpause import CollectorPause


def test_nested_pauses_resume_the_collector_once_at_the_end() -> None:
    pause = CollectorPause()
    assert gc.isenabled()
    try:
        with pause:
            assert not gc.isenabled()
            with pause:
                assert not gc.isenabled()
            assert not gc.isenabled()
        assert gc.isenabled()
    finally:
        gc.enable()


def test_a_collector_that_was_off_stays_off() -> None:
    pause = CollectorPause()
    gc.disable()
    try:
        with pause:
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()
