"""Errors of chatwatch.

ChatwatchError
 +-- StoreUnavailable      the session store cannot be reached (HTTP 503)
 +-- NotFound              an admin command named a row that does not exist
 +-- BusUnavailable        NATS could not be reached for a one-shot command
 +-- UsageError            bad input or configuration: one line, exit 2
 +-- HistoryError          the JetStream stream cannot be used as configured
"""


class ChatwatchError(Exception):
    """Root of every error chatwatch raises on purpose."""


class StoreUnavailable(ChatwatchError):
    """Raised by a store when its database cannot be opened or queried.

    The HTTP layer turns it into 503 with Retry-After; open streams are unaffected.
    """


class NotFound(ChatwatchError):
    """Raised by store admin operations when the named user or session does not exist."""


class BusUnavailable(ChatwatchError):
    """Raised by one-shot NATS helpers (``chatwatch publish``) when no server answers."""


class UsageError(ChatwatchError):
    """Bad input or configuration, found before anything starts: one line, exit 2.

    The message names the setting as the user gave it (the flag, or the environment
    variable when the value came from there).
    """


class HistoryError(ChatwatchError):
    """The JetStream stream for history exists but does not fit, or cannot be made."""


def unwrap_single(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception inside nested single-member groups, else the group itself.

    Nurseries wrap everything in groups; callers of our context managers should see
    the error they would expect (StoreUnavailable, KeyboardInterrupt), not a group.
    """
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
