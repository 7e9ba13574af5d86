"""The one exception type the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input from the user: the message says what is wrong and where, in one line."""


class DataError(UserError):
    """A dataset that cannot be read as it claims: a damaged shard, a row that does not decode.

    Raised on the driver while shards are listed and inside Ray Data tasks while rows are
    decoded; the message alone names the shard file and the row (index and id), so it stays
    useful wherever it surfaces (a failed trial, the CLI).
    """
