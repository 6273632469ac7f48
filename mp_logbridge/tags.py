"""The tag: how a log record says "this is also a Mixpanel message".

:data:`tag` (a :class:`TagBuilder` for the default attribute name ``"mixpanel"``) builds the
``extra=`` mapping (a :class:`TagExtra`) in the Tracker's vocabulary: ``tag.track``,
``tag.people.set``, ``tag.charge``, ``tag.groups.set``, ...; ``+`` puts several messages on
one record. The tag itself is plain JSON-like data, so it survives ``QueueHandler``, pickling
and JSON log files.
"""

from __future__ import annotations

from ._tags import DEFAULT_TAG, TagBuilder, TagExtra, tag

__all__ = ["DEFAULT_TAG", "TagBuilder", "TagExtra", "tag"]
