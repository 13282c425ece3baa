"""The base class of igpt-fast's expected failures.

Bad input, a missing or incompatible artefact (palette, shards, checkpoint) or a request that cannot
be served raises a subclass of IGPTError with a message that names the fix. The command line catches
IGPTError once, in `igpt_fast.cli.main`, and shows it as one line; anything else is a bug and keeps
its traceback.
"""


class IGPTError(Exception):
    """An expected failure of igpt-fast (bad input, missing or incompatible artefact): shown as one line by the CLI."""


class OutputError(IGPTError, OSError):
    """A file or folder igpt-fast must write cannot be written: no space left (the message names the file
    and the space that was free), a read-only place, a path whose parent is not a folder."""
