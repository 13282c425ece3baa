"""igpt-fast's expected failures: IGPTError and every subclass, in one place.

Bad input, a missing or incompatible artefact (palette, shards, checkpoint) or a request that cannot
be served raises a subclass of IGPTError with a message that names the fix. The command line catches
IGPTError once, in its click group (`igpt_fast.cli`), and shows it as one line; anything else is a bug
and keeps its traceback. Each class is also importable from the module that raises it (e.g.
`igpt_fast.sample.SampleError`), its public home before they were gathered here.
"""


class IGPTError(Exception):
    """An expected failure of igpt-fast (bad input, missing or incompatible artefact): shown as one line by the CLI."""


class OutputError(IGPTError, OSError):
    """A file or folder igpt-fast must write cannot be written: no space left (the message names the file
    and the space that was free), a read-only place, a path whose parent is not a folder."""


class TokenizeError(IGPTError, ValueError):
    """A source, setting or output folder that cannot be used (one-line message naming the fix)."""


class TrainError(IGPTError, ValueError):
    """A training request that cannot run as given (run folder in use, conflicting resume flags)."""


class TrainingDiverged(IGPTError, RuntimeError):
    """The loss (or gradient norm) became non-finite or blew up."""


class RunStopped(IGPTError):
    """The run stopped on SIGTERM or SIGINT after saving its last step; exit_code is 128 + the signal."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.signum, self.exit_code = signum, 128 + signum


class FinetuneError(IGPTError, ValueError):
    """A finetuning request that cannot run: no pretrained checkpoint, no labels."""


class ProbeError(IGPTError, ValueError):
    """Data that cannot be probed: no labels, a missing split, too few classes."""


class SampleError(IGPTError, ValueError):
    """A sampling request that cannot be served (bad rows, missing palette, missing checkpoint)."""


class DataError(IGPTError, ValueError):
    """A dataset that cannot be read as asked: missing meta.json, no shards, a corrupt shard."""


class DataMismatchError(DataError):
    """Data (meta.json / palette) that does not fit the model or checkpoint."""


class PaletteError(IGPTError, ValueError):
    """A palette file or array that cannot be used."""


class CheckpointError(IGPTError, ValueError):
    """A path that is not a readable igpt-fast checkpoint, or a checkpoint that does not fit a model."""


class ConversionError(IGPTError, ValueError):
    """A checkpoint that cannot be mapped exactly between HF ImageGPT and IGPT."""


class TFCheckpointError(IGPTError, ValueError):
    """A path that is not a readable TensorFlow checkpoint, or one this reader does not support."""


class ProgressError(IGPTError, ValueError):
    """IGPT_FAST_PROGRESS_SECONDS is not a number of seconds >= 0."""


class RunLogError(IGPTError, ValueError):
    """A log.jsonl damaged before its last line."""


class RunInUse(IGPTError, RuntimeError):
    """The run folder is held by another running process (its RUN/.lock is locked)."""
