"""Method and loss settings that check themselves when they are built.

A method's (or loss's) ``Config`` is a dataclass deriving from :class:`MethodSettings` (or
:class:`LossSettings`). Building one checks every field, so a bad ``--set`` value is refused
while the run is being planned, before any teacher or dataset is loaded, and ``--dry-run`` and a
sweep's up-front check see the same error::

    @dataclass
    class Config(MethodSettings):
        g_steps: int = at_least(1, default=200)  # a count that must be >= 1
        adv_mode: str = choice("js", "masked")   # the default first, then the other allowed values
        tv: float = 1e-3                         # any number: finite and >= 0 unless told otherwise

        def check(self) -> None:                 # constraints between fields (optional)
            ...

Every error is a :class:`~dfkd_bench.errors.DfkdError` naming the key as the user types it
(``method.adv_mode``), so the command line prints one line and exits 2.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

from .errors import DfkdError


def choice(default: str, *others: str) -> Any:
    """A text setting restricted to ``(default, *others)``; the allowed values are listed in its errors."""
    return dataclasses.field(default=default, metadata={"choices": (default, *others)})


def at_least(minimum: float, *, default: float) -> Any:
    """A numeric setting that must be ``>= minimum`` (plain numeric settings must be ``>= 0``)."""
    return dataclasses.field(default=default, metadata={"min": minimum})


def allowed_values(cls: type, name: str) -> tuple[str, ...] | None:
    """The values an enumerated setting of the Config class ``cls`` takes, or None when it is free."""
    if name not in {f.name for f in dataclasses.fields(cls)}:
        raise KeyError(name)
    return _declared(cls, name).get("choices")


def check_fields(config: Any, scope: str) -> None:
    """The field checks of :class:`Settings` on any dataclass instance (a plugin's plain Config too).

    Raises:
        DfkdError: naming ``<scope>.<field>``, the allowed values or bound, and the value given.
    """
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        key = f"{scope}.{f.name}"
        meta = _declared(type(config), f.name)
        allowed = meta.get("choices")
        if allowed is not None:
            if value not in allowed:
                raise DfkdError(f"{key} must be one of {', '.join(allowed)}, got '{value}'")
            continue
        minimum = meta.get("min", 0)
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, (int, float)) and not isinstance(item, bool) and not (
                    math.isfinite(item) and item >= minimum):
                bound = "a finite, non-negative number" if minimum == 0 else f"a finite number >= {minimum}"
                raise DfkdError(f"{key} must be {bound}, got {item}")


def _declared(cls: type, name: str) -> Any:
    """The constraints of field ``name``: its own, or those of the nearest base that declares it with some,
    so a subclass that only changes a default (``g_steps: int = 5``) keeps the base's bound."""
    for klass in cls.__mro__:
        f = getattr(klass, "__dataclass_fields__", {}).get(name)
        if f is not None and f.metadata:
            return f.metadata
    return {}


class Settings:
    """Base of the Config dataclasses; ``scope`` is the prefix a user types (``method`` or ``loss``).

    Checks, in field order: an enumerated field holds one of its values; a number (int or float,
    not bool) is finite and at least its minimum (0 unless declared with :func:`at_least`); a tuple
    of numbers, each element the same. Then :meth:`check` for constraints between fields.
    """

    scope: ClassVar[str] = "method"

    def __post_init__(self) -> None:
        check_fields(self, self.scope)
        self.check()

    def check(self) -> None:
        """Constraints between fields; raise :class:`DfkdError` naming the key. Default: none."""

    def key(self, name: str) -> str:
        """How the user writes the setting ``name`` of this Config: ``method.name`` or ``loss.name``."""
        return f"{self.scope}.{name}"


class MethodSettings(Settings):
    """Base of a synthesizer's ``Config`` (keys ``method.*``)."""

    scope: ClassVar[str] = "method"


class LossSettings(Settings):
    """Base of a distillation loss's ``Config`` (keys ``loss.*``)."""

    scope: ClassVar[str] = "loss"


__all__ = ["MethodSettings", "LossSettings", "Settings", "allowed_values", "at_least", "check_fields", "choice"]
