"""The Mixpanel Ruby SDK's vocabulary in Python: :class:`Tracker` with its :class:`People` and
:class:`Groups`, and :class:`ErrorHandler` for delivery errors."""

from __future__ import annotations

from ._tracker import ErrorHandler, Groups, People, Tracker

__all__ = ["ErrorHandler", "Groups", "People", "Tracker"]
