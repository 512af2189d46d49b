"""What the platform adds to one Celery app: settings, ledger, Redis client, lease keeper and
completer, in one :class:`Platform` object stored on the app.

A plain ``Celery`` app has no room for the platform's state, so :func:`synth_workers.install`
stores a ``Platform`` on the app and :func:`platform_of` finds it again. Nothing here connects
anywhere when built: the ledger's pool and the Redis client open on first use.
"""

from __future__ import annotations

import os
from functools import cached_property
from typing import TYPE_CHECKING, Any

import redis

from synth_workers import liveness
from synth_workers.errors import ConfigurationError
from synth_workers.ledger import LeaseKeeper, Ledger
from synth_workers.ledger.claimgroup import ClaimGroup
from synth_workers.ledger.completer import Completer
from synth_workers.lifecycle import Lifecycle
from synth_workers.redisconn import redis_client
from synth_workers.settings import Settings

if TYPE_CHECKING:
    from synth_workers.announce import ResultAnnouncer
    from synth_workers.events import EventBuffer

#: The app attribute :func:`synth_workers.install` stores the platform under.
PLATFORM_ATTR = "synth_platform"


class Platform:
    """The platform's state for one Celery app (reach it with :func:`platform_of`)."""

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        #: The Redis Streams event writer, when ``SYNTH_EVENTS_ENABLED`` (set by install).
        self.events: EventBuffer | None = None
        self.results: ResultAnnouncer | None = None
        #: Whether the app routes tasks to the platform's job-kind queues (its own app,
        #: ``create_app``); an adopted app keeps Celery's routing (set by install).
        self.routes_by_kind = False
        self._keeper: LeaseKeeper | None = None
        self._completer: Completer | None = None
        self._claims: ClaimGroup | None = None

    def __repr__(self) -> str:
        return f"<Platform of {getattr(self.app, 'main', None)!r}>"

    @cached_property
    def redis(self) -> redis.Redis:
        """Client for the platform's own reads of the broker (reconciling, depth)."""
        timeout = self.settings.redis_timeout
        return redis_client(
            self.settings,
            socket_connect_timeout=timeout,
            socket_timeout=timeout,
            **liveness.redis_kwargs(),
        )

    @cached_property
    def ledger(self) -> Ledger:
        """The job ledger (Postgres); its pool opens on first use."""
        return Ledger(self.settings)

    @property
    def lifecycle(self) -> Lifecycle:
        """Where every job state change is announced (events, metrics and logs listen)."""
        return self.ledger.lifecycle

    @property
    def lease_keeper(self) -> LeaseKeeper:
        """This process's lease keeper (a new one after fork)."""
        keeper = self._keeper
        if keeper is None or keeper.pid != os.getpid() or keeper.stopped:
            keeper = self._keeper = LeaseKeeper(self.ledger, self.settings.lease_seconds)
        return keeper

    @property
    def completer(self) -> Completer:
        """This process's batched-completion writer (a new one after fork)."""
        completer = self._completer
        keeper = self.lease_keeper
        if completer is None or completer.keeper is not keeper or completer.stopped:
            completer = self._completer = Completer(self.ledger, keeper)
        return completer

    @property
    def claims(self) -> ClaimGroup:
        """This process's claims, grouped while one is on the wire (a new group after fork)."""
        group = self._claims
        if group is None or group.pid != os.getpid():
            group = self._claims = ClaimGroup(self.ledger)
        return group

    def flush_completions(self) -> None:
        """A worker process stops: write its completions, then stop its writer and lease
        threads (see ``ledger.completer``)."""
        if self._completer is not None and self._completer.keeper is self._keeper:
            self._completer.stop()
        if self._keeper is not None and self._keeper.pid == os.getpid():
            self._keeper.stop()

    def close(self) -> None:
        """Close the ledger's pool if it was opened."""
        if "ledger" in self.__dict__:
            self.ledger.close()


def find_platform(app: Any) -> Platform | None:
    """``app``'s platform, or ``None`` when ``app`` was never installed (or is no app)."""
    if app is None:
        return None
    platform = getattr(app, PLATFORM_ATTR, None)
    return platform if isinstance(platform, Platform) else None


def platform_of(app: Any) -> Platform:
    """``app``'s platform; :class:`ConfigurationError` when ``install(app)`` never ran."""
    platform = find_platform(app)
    if platform is None:
        raise ConfigurationError(
            f"Celery app {getattr(app, 'main', None)!r} is not a platform app: "
            "call synth_workers.install(app) first"
        )
    return platform
