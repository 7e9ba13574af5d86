"""UserError, the one exception the CLI turns into a one-line message (exit code 2, or 3 for
ServiceUnavailable), and the helpers that find that one line inside wrapped errors (Ray tasks,
Train workers, MLflow)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: the message says what is wrong and where, in one line."""


class ServiceUnavailable(UserError):
    """A service segsearch needs did not answer: an S3 endpoint, an MLflow tracking server, a Ray
    cluster or its dashboard. Worth trying again later, unlike other bad input, so the CLI gives
    it an exit code of its own (3) for scripts to tell "S3 is down" from a typo."""


class DataError(UserError):
    """A dataset that cannot be read as it claims: a damaged shard, a row that does not decode.

    Raised on the driver while shards are listed and inside Ray Data tasks while rows are
    decoded; the message alone names the shard file and the row (index and id), so it stays
    useful wherever it surfaces (a failed trial, the CLI).
    """


def first_line(err: BaseException) -> str:
    """An error's message cut to its first line (its type when it has none), for one-line errors.

    MLflow's exceptions keep their message in `.message`; str() of them may add more.
    """
    text = str(getattr(err, "message", None) or err).strip()
    return text.splitlines()[0] if text else type(err).__name__


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
        return first_line(found)
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__
