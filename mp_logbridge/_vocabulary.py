"""The Mixpanel vocabulary of profile and group operations, written once.

Each :class:`Operation` says what a method of the Ruby SDK's ``People``/``Groups`` does: its
name, the Mixpanel operator it sends, the arguments it takes after the user (or the group),
whether it takes ``ip`` and ``optional_params``, and how its arguments become the operator's
value (checked the same way, wherever the call comes from). The Tracker's ``people``/``groups``
and the tag builders ``tag.people``/``tag.groups`` are both made from this table, and the test
suite checks that every operation gives the same record through both, with the same signature.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from . import _messages as msg
from ._errors import InvalidMessageError
from ._values import describe

__all__ = ["GROUPS", "PEOPLE", "Operation"]


@dataclass(frozen=True)
class Operation:
    """One profile or group operation.

    ``arguments`` are the method's own arguments after the user's ``distinct_id`` (or the
    group's ``group_key`` and ``group_id``), in order; ``defaults`` gives the default of the
    trailing ones; ``value`` turns them into the operator's value.
    """

    name: str
    operator: str
    arguments: tuple[str, ...]
    value: Callable[..., Any]
    takes_ip: bool = True
    takes_optional_params: bool = True
    defaults: tuple[Any, ...] = ()

    def apply(self, args: Sequence[Any], scope: str, *, check: bool = True) -> tuple[str, Any]:
        """``(operator, value)`` for the method's own arguments; with ``check`` the value is a
        checked private copy (the record builders check it otherwise)."""
        value = self.value(*args)
        if not check:
            return self.operator, value
        kind = "group_update" if scope == "groups" else "profile_update"
        return self.operator, msg.operation_value(self.operator, value, kind)


def _as_is(properties: Any) -> Any:
    return properties


def _one(property_name: Any) -> dict[str, int]:
    if not isinstance(property_name, str) or not property_name:
        raise InvalidMessageError(
            "property_name", f"must be a non-empty string, got {describe(property_name)}"
        )
    return {property_name: 1}


def _charge(amount: Any, properties: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {"$transactions": msg.charge_transaction(amount, properties)}


def _transactions() -> list[str]:
    return ["$transactions"]


def _nothing() -> str:
    return ""


def _table(*operations: Operation) -> Mapping[str, Operation]:
    return MappingProxyType({operation.name: operation for operation in operations})


#: Profile operations (``tracker.people.<name>``, ``tag.people.<name>``).
PEOPLE: Mapping[str, Operation] = _table(
    Operation("set", "$set", ("properties",), _as_is),
    Operation("set_once", "$set_once", ("properties",), _as_is),
    Operation("increment", "$add", ("properties",), _as_is),
    Operation("plus_one", "$add", ("property_name",), _one),
    Operation("append", "$append", ("properties",), _as_is),
    Operation("union", "$union", ("properties",), _as_is),
    Operation("remove", "$remove", ("properties",), _as_is),
    Operation("unset", "$unset", ("properties",), _as_is),
    Operation(
        "track_charge",
        "$append",
        ("amount", "properties"),
        _charge,
        defaults=(None,),
    ),
    Operation("clear_charges", "$unset", (), _transactions),
    Operation(
        "delete_user",
        "$delete",
        (),
        _nothing,
        takes_ip=False,
    ),
)

#: Group operations (``tracker.groups.<name>``, ``tag.groups.<name>``): groups have no
#: ``$add`` or ``$append``.
GROUPS: Mapping[str, Operation] = _table(
    Operation("set", "$set", ("properties",), _as_is),
    Operation("set_once", "$set_once", ("properties",), _as_is),
    Operation("remove", "$remove", ("properties",), _as_is),
    Operation("union", "$union", ("properties",), _as_is),
    Operation("unset", "$unset", ("properties",), _as_is),
    Operation("delete_group", "$delete", (), _nothing, takes_ip=False),
)
