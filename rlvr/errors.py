"""User errors: the one exception type every layer raises for a setting or an input the user can
fix. The entry points (rlvr.train, rlvr.evaluate) print it as one `error: ...` line and exit with
status 2. Its own module, so that data, models and checkpoints need not import the command line."""


class UserError(ValueError):
    """A setting or an input the user can fix; printed as one line, exit status 2."""
