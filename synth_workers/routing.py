"""Queue topology, priority levels and routes.

**The priority rule** (the only place it is stated): a job's priority is an integer from
0 to 9 and **a bigger number runs first**. The names are aliases: ``low`` = 2,
``normal`` = 5 (the default), ``high`` = 8, so 9 is above ``high`` and 0 and 1 below ``low``.
Within one priority, jobs run in the order they were enqueued (FIFO). Priorities are strict
across all the queues a worker consumes: a worker takes the most urgent waiting job of any of
its queues.

Redis has no priority queue, so each queue is ten Redis lists, one per level, and a worker's
``BRPOP`` names them most urgent first (kombu's ``priority_steps``). kombu counts the other
way (0 is its most urgent list); :func:`to_transport` converts.

Routes: ``tasks.email.*`` → ``email``, ``tasks.orchestration.*`` → ``orchestration``,
``tasks.embeddings.*`` → ``embeddings`` (or ``embeddings.gpu`` when the job asks for a GPU),
anything else → ``default``. A task's own ``queue=`` option and an explicit ``queue=`` at
enqueue win over these routes.

**Celery's default queue** ``celery`` (:data:`CELERY_DEFAULT`): a plain Celery producer with
default settings (``Celery(broker=...).send_task(...)``, ``task_default_queue`` unset) sends
there. Our routes never do, but the messages are not lost: ``celery`` is declared like our
queues (ten priority lists), every worker that consumes ``default`` also consumes ``celery``
(added at worker setup by :mod:`synth_workers.install`, as Celery documents for
``celeryd_after_setup``), a worker given no ``-Q`` consumes it with all the others, and such
a job gets its ledger row when it arrives (adopted, with queue ``celery``), after which it is
reaped, retried and reconciled like any job. It is not one of :data:`QUEUES` (the queues our
routes send to).
"""

from __future__ import annotations

from typing import Any, Final, Literal

from kombu import Queue

from synth_workers.errors import RoutingError

PriorityName = Literal["high", "normal", "low"]
Priority = PriorityName | int

PRIORITY_LEVELS: Final[dict[str, int]] = {"low": 2, "normal": 5, "high": 8}
MIN_PRIORITY: Final = 0
MAX_PRIORITY: Final = 9
DEFAULT_PRIORITY: Final = PRIORITY_LEVELS["normal"]

EMAIL: Final = "email"
ORCHESTRATION: Final = "orchestration"
EMBEDDINGS: Final = "embeddings"
EMBEDDINGS_GPU: Final = "embeddings.gpu"
DEFAULT: Final = "default"
QUEUES: Final[tuple[str, ...]] = (EMAIL, ORCHESTRATION, EMBEDDINGS, EMBEDDINGS_GPU, DEFAULT)
#: Celery's own default queue name (``task_default_queue`` of a plain Celery app).
CELERY_DEFAULT: Final = "celery"

_PREFIX_ROUTES: Final[dict[str, str]] = {
    "tasks.email.": EMAIL,
    "tasks.orchestration.": ORCHESTRATION,
    "tasks.embeddings.": EMBEDDINGS,
}


def resolve_priority(priority: Priority | None) -> int:
    """Turn a name or an integer into the 0–9 level; raise ``RoutingError`` otherwise."""
    if priority is None:
        return DEFAULT_PRIORITY
    if isinstance(priority, bool):
        raise RoutingError(f"priority must be high, normal, low or 0-9, got {priority!r}")
    if isinstance(priority, int):
        if MIN_PRIORITY <= priority <= MAX_PRIORITY:
            return priority
        raise RoutingError(f"priority must be between 0 and 9, got {priority}")
    if isinstance(priority, str) and priority in PRIORITY_LEVELS:
        return PRIORITY_LEVELS[priority]
    raise RoutingError(f"priority must be high, normal, low or 0-9, got {priority!r}")


def to_transport(priority: int) -> int:
    """Our level (9 = most urgent) to kombu's Redis level (0 = most urgent)."""
    return MAX_PRIORITY - priority


def from_transport(value: int) -> int:
    """kombu's Redis level back to ours."""
    return MAX_PRIORITY - value


def foreign_priority(value: Any) -> int:
    """The level of a message sent around the platform (no ledger row), from its kombu
    priority. kombu files a message sent without a priority as 0, its most urgent step, the
    same as an explicit 0: such a message is ``normal``, not 9. Above 9 is kombu's last step."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return DEFAULT_PRIORITY
    return from_transport(min(value, MAX_PRIORITY))


def queue_for_task(name: str) -> str:
    """The queue a task name routes to by default."""
    for prefix, queue in _PREFIX_ROUTES.items():
        if name.startswith(prefix):
            return queue
    return DEFAULT


def resolve_queue(name: str, queue: str | None = None, *, gpu: bool = False) -> str | None:
    """The queue for one enqueue call, or ``None`` to let the task's own routing decide.

    ``gpu=True`` sends an embedding job to ``embeddings.gpu``; asking it of another job kind
    is a ``RoutingError``.
    """
    if gpu:
        target = queue or queue_for_task(name)
        if target not in (EMBEDDINGS, EMBEDDINGS_GPU):
            raise RoutingError(f"gpu=True is for embedding jobs; {name} goes to {target!r}")
        return EMBEDDINGS_GPU
    if queue is not None and not queue:
        raise RoutingError("queue must be a non-empty name")
    return queue


def route_task(
    name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any
) -> dict[str, str]:
    """Celery router (``task_routes``): by task-name prefix."""
    return {"queue": queue_for_task(name)}


def celery_queues() -> tuple[Queue, ...]:
    """The queues a worker declares (ours and Celery's default ``celery``); ``max_priority``
    marks them as prioritised."""
    return tuple(
        Queue(name, routing_key=name, max_priority=MAX_PRIORITY)
        for name in (*QUEUES, CELERY_DEFAULT)
    )


def with_celery_default(consumed: list[str]) -> list[str]:
    """The queues a worker consumes given ``consumed`` (its ``-Q``): Celery's default queue
    is added wherever ``default`` is consumed (see the module docstring)."""
    if DEFAULT in consumed and CELERY_DEFAULT not in consumed:
        return [*consumed, CELERY_DEFAULT]
    return consumed
