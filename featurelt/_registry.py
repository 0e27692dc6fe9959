"""One small registry class used for every kind of pluggable component.

Encoders, heads, losses and samplers each have one ``Registry`` instance. Entries are
added with the ``register`` decorator and looked up with ``get``; an unknown name fails
with the list of choices (timm-style), so a typo never silently picks a default.
"""
from __future__ import annotations

from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A named mapping ``name -> factory`` for one kind of component (``kind`` is used in errors)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str, *, help: str | None = None) -> Callable[[T], T]:
        """Decorator: ``@LOSSES.register("ce")``. Registering a name twice is an error."""

        def deco(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = obj
            doc = help if help is not None else (getattr(obj, "__doc__", None) or "")
            self._help[name] = doc.strip().splitlines()[0] if doc.strip() else ""
            return obj

        return deco

    def get(self, name: str) -> T:
        """Return the entry called ``name``; ``KeyError`` lists the available names otherwise."""
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(
                f"unknown {self.kind} '{name}'; available: {', '.join(self.names())}"
            ) from None

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """``get(name)(*args, **kwargs)``; a bad option's ``TypeError`` names the entry (``loss 'focal': ...``)."""
        factory = self.get(name)
        try:
            return factory(*args, **kwargs)  # type: ignore[operator]
        except TypeError as exc:
            raise TypeError(f"{self.kind} '{name}': {exc}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def help(self, name: str) -> str:
        """First line of the entry's docstring (or the ``help=`` given at registration)."""
        self.get(name)
        return self._help[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
