"""Errors that carry a message meant for the user: what went wrong, on which sample, and the fix."""


class AlignTIError(Exception):
    """Base class; the CLI prints these without a traceback and exits non-zero."""


class DataError(AlignTIError):
    """A sample (or a line of the data file) cannot be used."""

    def __init__(self, sample: str, problem: str, fix: str = "fix the sample or pass --skip-bad to record it as skipped"):
        self.sample = sample
        self.problem = problem
        self.fix = fix
        super().__init__(f"sample {sample}: {problem} ({fix})")


class CacheError(AlignTIError):
    """The cache is incomplete, damaged, or does not fit the run."""


class FingerprintMismatch(CacheError):
    """The cache was made with another tokenizer / processor / parameters."""


class ResourceError(AlignTIError):
    """A failure that is not about one sample (disk full, permission, out of memory): one line naming the resource
    and what to do; finished work is kept and re-running the same command resumes."""
