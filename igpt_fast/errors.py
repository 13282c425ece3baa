"""The base class of igpt-fast's expected failures.

Bad input, a missing or incompatible artefact (palette, shards, checkpoint) or a request that cannot
be served raises a subclass of IGPTError with a message that names the fix. The command line catches
IGPTError once, in `igpt_fast.cli.main`, and shows it as one line; anything else is a bug and keeps
its traceback.
"""


class IGPTError(Exception):
    """An expected failure of igpt-fast (bad input, missing or incompatible artefact): shown as one line by the CLI."""
