"""Does a job's payload bind to its task? Checked where the job runs, before the task's code.

A payload that does not bind (wrong argument count or names, or a value that does not fit a
parameter's annotation) can never succeed, so it is dead at once with failure class
``invalid_payload`` instead of being retried. Annotations are checked with pydantic in its
lax mode (``"3"`` fits ``int``; ``"abc"`` does not) and only checked: the task gets the values
as they were sent. Parameters without an annotation, or annotated ``Any``, take anything.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pydantic import TypeAdapter, ValidationError

from synth_workers.errors import InvalidArgumentsError, InvalidPayloadError


class Binding:
    """The signature of one task's ``run``, with a validator per annotated parameter."""

    def __init__(self, name: str, func: Callable[..., Any]) -> None:
        self.name = name
        self.signature = inspect.signature(func)
        self.adapters: dict[str, TypeAdapter[Any]] = {}
        try:
            hints = typing.get_type_hints(func)
        except Exception:
            hints = {}
        for param in self.signature.parameters.values():
            hint = hints.get(param.name)
            if hint is None or hint is Any or hint is object:
                continue
            try:
                self.adapters[param.name] = TypeAdapter(hint)
            except Exception:  # noqa: S112 - a type pydantic cannot check is not checked
                continue

    def check(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        """Raise :class:`InvalidPayloadError` when ``args``/``kwargs`` do not bind."""
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise InvalidArgumentsError(f"{self.name}: {exc}") from None
        params = self.signature.parameters
        for name, value in bound.arguments.items():
            adapter = self.adapters.get(name)
            if adapter is None:
                continue
            kind = params[name].kind
            if kind is inspect.Parameter.VAR_POSITIONAL:
                values: list[tuple[str, Any]] = [(f"{name}[{i}]", v) for i, v in enumerate(value)]
            elif kind is inspect.Parameter.VAR_KEYWORD:
                values = [(f"{name}[{k!r}]", v) for k, v in value.items()]
            else:
                values = [(name, value)]
            for label, item in values:
                try:
                    adapter.validate_python(item)
                except ValidationError as exc:
                    problem = exc.errors()[0].get("msg", str(exc)) if exc.errors() else str(exc)
                    raise InvalidPayloadError(
                        f"{self.name}: argument {label}={_short(item)} does not fit its "
                        f"annotation: {problem}"
                    ) from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
