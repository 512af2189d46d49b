"""A Celery app's configuration, read on the hot path.

``app.conf.task_serializer`` goes through Celery's ``ConfigurationView``: the attribute miss,
the old setting names (``CELERY_TASK_SERIALIZER``) worked out again, a ``KeyError`` caught per
map that lacks the key. That is about 3 µs a read, and a single send makes seven of them.
:func:`setting` gives the same answer in about a tenth of the time: the names to try are worked
out once per key, and a plain ``dict`` is asked with ``in``. Anything it does not know how to
read as Celery does (a configuration not yet finalized, a key transform, a setting Celery
computes in a property) is read the ordinary way.
"""

from __future__ import annotations

from typing import Any

from celery.app.utils import Settings

#: Per key (and the view's prefix and old-name functions): the names Celery tries, in its order,
#: or ``None`` where the key is a property of ``Settings`` (read as an attribute).
_NAMES: dict[tuple[str, Any, Any], tuple[str, ...] | None] = {}
_PROPERTIES = frozenset(k for k, v in vars(Settings).items() if isinstance(v, property))


def setting(conf: Any, key: str) -> Any:
    """``getattr(conf, key)`` for ``conf``, an app's ``app.conf``: the same value, read faster
    when ``conf`` is a finalized ``Settings`` (see the module docstring)."""
    if type(conf) is not Settings or conf.key_t is not None:
        return getattr(conf, key)
    state = conf.__dict__
    cache_key = (key, state.get("prefix"), state.get("_keys"))
    try:
        names = _NAMES[cache_key]
    except KeyError:
        names = None if key in _PROPERTIES else tuple(conf._to_keys(key))
        _NAMES[cache_key] = names
    if names is None:
        return getattr(conf, key)
    maps: list[Any] = conf.maps or []
    for mapping in maps:
        if type(mapping) is dict:
            for name in names:
                if name in mapping:
                    return mapping[name]
        else:
            for name in names:
                try:
                    return mapping[name]
                except KeyError:
                    pass
    return getattr(conf, key)  # Celery's own answer for a missing key
