"""Function calls as Mixpanel events: the :func:`instrument` decorator, and instrumenting code you
do not own by dotted path (:func:`instrument_function`, :func:`instrument_functions` from a
file, :func:`uninstrument_function`); :func:`instrumentation_stats` counts events that could not
be produced."""

from __future__ import annotations

from ._instrument import instrument, instrumentation_stats
from ._patching import instrument_function, instrument_functions, uninstrument_function

__all__ = [
    "instrument",
    "instrument_function",
    "instrument_functions",
    "instrumentation_stats",
    "uninstrument_function",
]
