"""The one exception type the CLI turns into a one-line message and exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: the message says what is wrong and where, in one line."""


def user_error_in(err: BaseException) -> UserError | None:
    """The UserError behind `err`, or None.

    Ray re-raises a remote UserError as a `RayTaskError` subclass of it whose text is a whole
    traceback (the original is its `cause`), and Ray Train collects worker exceptions in
    `worker_failures`: this walks those and the exception chain to the original, one-line error.
    """
    seen: set[int] = set()
    pending: list[BaseException | None] = [err]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        cause = getattr(current, "cause", None)
        if isinstance(current, UserError) and not isinstance(cause, BaseException):
            return current
        failures = getattr(current, "worker_failures", None) or {}
        pending += [current.__context__, current.__cause__, *failures.values(), cause]
    return None


def last_line(err: BaseException) -> str:
    """What went wrong in one line: a UserError's message, else the error's last line."""
    found = user_error_in(err)
    if found is not None:
        return str(found)
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__
