"""One registry per extension kind: synthesizers, distillation losses, datasets, presets.

Usage, bare or with a key::

    @SYNTHESIZERS.register
    class MyMethod(Synthesizer): ...

    @LOSSES.register("kl")
    class KLLoss(DistillLoss): ...

Registration happens on import. The built-in methods and baselines are imported by
:func:`load_plugins`, which also imports third-party modules named by the
``dfkd_bench.methods`` entry-point group or passed explicitly (``--plugin module``).
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from importlib.metadata import entry_points
from typing import Any, Generic, Iterator, TypeVar

from .errors import DfkdError, UnknownNameError

T = TypeVar("T")

class Registry(Generic[T]):
    """A name -> object map that refuses duplicates and explains unknown names."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, obj: Any = None, *, name: str | None = None, force: bool = False) -> Any:
        """Register ``obj`` under ``name`` (default: its ``name`` attribute or ``__name__``).

        Works as ``@reg.register``, ``@reg.register("key")`` or ``reg.register(obj, name=...)``.
        """
        if isinstance(obj, str):  # @reg.register("key")
            key = obj
            return lambda target: self._add(target, key, force)
        if obj is None:  # @reg.register(name="key")
            return lambda target: self._add(target, name, force)
        return self._add(obj, name, force)

    def _add(self, obj: T, name: str | None, force: bool) -> T:
        key = name or getattr(obj, "name", None) or getattr(obj, "__name__")
        if not isinstance(key, str) or not key:
            raise ValueError(f"cannot register {obj!r} in {self.kind} registry without a name")
        if key in self._items and not force and self._items[key] is not obj:
            raise KeyError(f"{self.kind} '{key}' is already registered ({self._items[key]!r})")
        self._items[key] = obj
        return obj

    def get(self, name: str) -> T:
        if name in self._items:
            return self._items[name]
        raise UnknownNameError(unknown_name_message(self.kind, name, self._items))

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())

    def unregister(self, name: str) -> None:
        """Remove ``name`` (for tests and plugin reloads)."""
        self._items.pop(name, None)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"

def unknown_name_message(kind: str, name: str, valid: Any) -> str:
    """``unknown method 'csdd'; did you mean 'csd'? (valid: cmi, csd, ...)``"""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    listed = ", ".join(valid) if len(valid) <= 30 else ", ".join(valid[:30]) + ", ..."
    return f"unknown {kind} '{name}'{hint} (valid: {listed})"

SYNTHESIZERS: Registry[type] = Registry("method")
LOSSES: Registry[type] = Registry("distillation loss")
DATASETS: Registry[Any] = Registry("dataset")
PRESETS: Registry[dict] = Registry("preset")

def register_preset(method: str, preset: str, overrides: dict[str, Any]) -> None:
    """Register a named preset for ``method``: overrides of run fields and ``method.*`` fields."""
    PRESETS.register(dict(overrides), name=f"{method}:{preset}")

def presets_for(method: str) -> list[str]:
    prefix = f"{method}:"
    return [key[len(prefix):] for key in PRESETS.names() if key.startswith(prefix)]

def get_preset(method: str, preset: str) -> dict[str, Any]:
    key = f"{method}:{preset}"
    if key in PRESETS:
        return dict(PRESETS.get(key))
    raise UnknownNameError(unknown_name_message(f"preset for {method}", preset, presets_for(method)))

_loaded: set[str] = set()

def load_plugins(extra: tuple[str, ...] | list[str] = ()) -> None:
    """Import the built-in methods and baselines, entry-point plugins and ``extra`` modules."""
    for package in ("dfkd_bench.methods", "dfkd_bench.baselines"):
        if package in _loaded:
            continue
        pkg = importlib.import_module(package)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{package}.{info.name}")
        _loaded.add(package)
    for ep in entry_points(group="dfkd_bench.methods"):
        if ep.value not in _loaded:
            ep.load()
            _loaded.add(ep.value)
    for module in extra:
        if module in _loaded:
            continue
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise DfkdError(f"cannot import plugin '{module}': {exc}") from None
        except DfkdError:
            raise
        except Exception as exc:  # the plugin's own code failed while it was imported
            where = _failing_line(exc)
            raise DfkdError(f"plugin '{module}' raised {type(exc).__name__} while it was imported{where}: "
                            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}") from None
        _loaded.add(module)


def _failing_line(exc: BaseException) -> str:
    """`` (file.py:N)``: the innermost frame of ``exc``'s traceback, so a plugin's author can find it."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return f" ({tb.tb_frame.f_code.co_filename}:{tb.tb_lineno})" if tb is not None else ""

__all__ = [
    "Registry", "SYNTHESIZERS", "LOSSES", "DATASETS", "PRESETS", "register_preset",
    "presets_for", "get_preset", "load_plugins", "unknown_name_message",
]
