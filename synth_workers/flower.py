"""Flower with our app: ``celery -A synth_workers flower``, locked by default.

When the ``celery`` command runs Flower with our app, :func:`apply_flower_defaults` (called
when the default app is built) sets Flower's options from our settings unless they were given:
basic auth with ``SYNTH_FLOWER_USER`` / ``SYNTH_FLOWER_PASSWORD``, address
``SYNTH_FLOWER_ADDRESS`` (127.0.0.1) and port ``SYNTH_FLOWER_PORT``. With no password
anywhere (neither ``SYNTH_FLOWER_PASSWORD``, ``FLOWER_BASIC_AUTH``/``--basic-auth`` nor
Flower's OAuth ``--auth``) Flower refuses to start: it never serves an open dashboard by
accident. ``synth-workers dev`` generates a password and shows it once.

Flower's task list comes from Celery task events; Flower turns them on in the workers itself
(its ``enable_events`` option, every few seconds), so workers need no ``-E``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from synth_workers.settings import Settings


#: ``celery`` options placed before the subcommand that take a separate value.
_VALUED = frozenset(
    {"-A", "--app", "-b", "--broker", "--result-backend", "--loader", "--config", "--workdir"}
)


def celery_subcommand(argv: Sequence[str]) -> str | None:
    """The subcommand when this process is ``celery [options] SUBCOMMAND ...`` (``worker``,
    ``beat``, ``flower``...); ``None`` when it is not the ``celery`` program."""
    if not argv or Path(argv[0]).name not in ("celery", "__main__.py"):
        return None
    args = iter(argv[1:])
    for arg in args:
        if arg in _VALUED:
            next(args, None)
        elif not arg.startswith("-"):
            return arg
    return ""


def is_flower_command(argv: Sequence[str]) -> bool:
    """Whether this process is ``celery [options] flower ...`` (flower the subcommand)."""
    return celery_subcommand(argv) == "flower"


def _given(argv: Sequence[str], *names: str) -> bool:
    return any(arg == f"--{n}" or arg.startswith(f"--{n}=") for arg in argv for n in names)


def apply_flower_defaults(
    settings: Settings,
    environ: MutableMapping[str, str] | None = None,
    argv: Sequence[str] | None = None,
) -> bool:
    """Set Flower's options from settings when this process runs Flower; ``True`` if it does.

    Raises ``SystemExit`` (naming the variables) when no password is configured.
    """
    env = os.environ if environ is None else environ
    args = sys.argv if argv is None else argv
    if not is_flower_command(args):
        return False
    if "FLOWER_ADDRESS" not in env and not _given(args, "address"):
        env["FLOWER_ADDRESS"] = settings.flower_address
    if "FLOWER_PORT" not in env and not _given(args, "port"):
        env["FLOWER_PORT"] = str(settings.flower_port)
    has_auth = (
        bool(env.get("FLOWER_BASIC_AUTH"))
        or bool(env.get("FLOWER_AUTH"))
        or _given(args, "basic_auth", "basic-auth", "auth")
    )
    if not has_auth:
        if settings.flower_password is None or not settings.flower_password.get_secret_value():
            raise SystemExit(
                "synth-workers: Flower needs a password: set SYNTH_FLOWER_PASSWORD (user "
                "SYNTH_FLOWER_USER, default admin) or FLOWER_BASIC_AUTH=user:password; "
                "`synth-workers dev` generates one"
            )
        secret = settings.flower_password.get_secret_value()
        env["FLOWER_BASIC_AUTH"] = f"{settings.flower_user}:{secret}"
    return True
