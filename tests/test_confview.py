"""``confview.setting`` answers what ``app.conf.<key>`` answers, in every way Celery lets a
setting be given."""

from __future__ import annotations

import types
from typing import Any

import pytest
from celery import Celery

from synth_workers.confview import setting

KEYS = (
    "task_always_eager",
    "task_send_sent_event",
    "task_serializer",
    "task_compression",
    "task_repr_maxlevels",
    "task_default_delivery_mode",
    "task_default_queue",
    "task_default_exchange",  # a property of Celery's Settings
    "broker_url",  # another
)


def _same(app: Celery) -> None:
    conf = app.conf
    for key in KEYS:
        assert setting(conf, key) == getattr(conf, key), key


def test_defaults_and_changes_read_as_celery_reads_them() -> None:
    app = Celery("confview", set_as_current=False)
    _same(app)
    assert setting(app.conf, "task_serializer") == "json"
    app.conf.task_serializer = "pickle"
    app.conf.task_default_queue = "elsewhere"
    assert setting(app.conf, "task_serializer") == "pickle"
    assert setting(app.conf, "task_default_queue") == "elsewhere"
    _same(app)
    app.conf.task_always_eager = True  # changed after it was read: read again
    assert setting(app.conf, "task_always_eager") is True


def test_old_setting_names_and_a_config_object() -> None:
    app = Celery("confview-old", set_as_current=False)
    app.config_from_object(
        types.SimpleNamespace(CELERY_ALWAYS_EAGER=True, CELERY_DEFAULT_QUEUE="old-named")
    )
    assert setting(app.conf, "task_always_eager") is True
    assert setting(app.conf, "task_default_queue") == "old-named"
    _same(app)
    app.conf.CELERY_TASK_SERIALIZER = "yaml"  # an old name set at run time
    assert app.conf.task_serializer == "yaml"
    assert setting(app.conf, "task_serializer") == "yaml"


def test_a_prefixed_namespace_and_an_unknown_key() -> None:
    app = Celery("confview-ns", set_as_current=False)
    app.config_from_object({"CELERY_TASK_DEFAULT_QUEUE": "prefixed"}, namespace="CELERY")
    assert setting(app.conf, "task_default_queue") == app.conf.task_default_queue == "prefixed"
    _same(app)
    with pytest.raises(AttributeError):
        setting(app.conf, "no_such_setting")


def test_what_it_cannot_read_itself_is_read_as_an_attribute() -> None:
    app = Celery("confview-keyt", set_as_current=False)
    app.conf.task_default_queue = "transformed"
    conf: Any = app.conf.copy()
    conf.__dict__["key_t"] = str.lower  # a key transform: Celery's own lookup applies it
    assert setting(conf, "TASK_DEFAULT_QUEUE") == conf.TASK_DEFAULT_QUEUE == "transformed"
    other = types.SimpleNamespace(task_serializer="msgpack")  # not Celery's Settings
    assert setting(other, "task_serializer") == "msgpack"
