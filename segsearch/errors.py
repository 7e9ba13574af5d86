"""The one exception type the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input from the user: the message says what is wrong and where, in one line."""


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
