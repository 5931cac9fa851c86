"""Errors that carry a message meant for the user: what went wrong, on which sample, and the fix."""

import re


def human_bytes(n: float) -> str:
    """A byte count for a person: KiB, MiB or GiB (binary units, one decimal)."""
    for unit, k in (("GiB", 30), ("MiB", 20)):
        if n >= 2 ** k:
            return f"{n / 2 ** k:.1f} {unit}"
    return f"{n / 2 ** 10:.1f} KiB"


class AlignTIError(Exception):
    """Base class; the CLI prints these without a traceback and exits non-zero."""


class ModelPathError(AlignTIError, FileNotFoundError):
    """A model path meant as a local folder that is not there (common.models.check_local_path). Also an OSError, so
    the early, tolerant config reads (dump-teacher's and rollout's checks before loading) pass it on to the loader,
    which names it."""


class DataError(AlignTIError):
    """A sample (or a line of the data file) cannot be used."""

    def __init__(self, sample: str, problem: str, fix: str = "fix the sample or pass --skip-bad to record it as skipped"):
        self.sample = sample
        self.problem = problem
        self.fix = fix
        super().__init__(f"sample {sample}: {problem} ({fix})")

    def __reduce__(self):  # pickled whole (torchrun hands rank 0's error to every rank)
        return type(self), (self.sample, self.problem, self.fix)


class DataSourceError(DataError):
    """The data source as a whole cannot be used (a file or folder: not found, not UTF-8, no samples, no usable row),
    not one sample of it: the message names the location, ``LOCATION: problem (fix)``. A DataError, so whatever
    handles data errors handles it; ``sample`` holds the location."""

    def __init__(self, location: str, problem: str, fix: str = "check --data"):
        self.sample, self.problem, self.fix = str(location), problem, fix
        AlignTIError.__init__(self, f"{location}: {problem} ({fix})")


# a sample's own "or pass --skip-bad" (the default fix's whole sentence included), dropped where a list of samples
# gives it once for all of them
_SKIP_HINT = re.compile(r"(,? or |^|\()?pass --skip-bad( to record it as skipped)?|fix the sample or pass --skip-bad to "
                        r"record it as skipped")


class BadSamples(DataError):
    """Several samples refused at once, before any work (a pre-flight check). The message lists the first three
    samples' own messages (each already names its sample) and the count; ``sample`` is the first one's id."""

    def __init__(self, bad: list[tuple[str, str]], before: str, fix: str):
        """bad: [(sample id, its message "sample ID: problem (fix)")]; before: what did not start ("dumping")."""
        self.sample, self.fix, self._init = bad[0][0], fix, (bad, before, fix)
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        listed = [m for _, m in bad[:3]]
        if "--skip-bad" in fix:  # said once, in the fix of the whole, not again in each sample's
            listed = [_SKIP_HINT.sub("", m).replace(" ()", "") for m in listed]
        self.problem = (f"{len(bad)} bad sample(s) found before {before}, nothing was written: "
                        + "; ".join(listed) + more)
        AlignTIError.__init__(self, f"{self.problem} ({fix})")

    def __reduce__(self):
        return type(self), self._init


class CacheError(AlignTIError):
    """The cache is incomplete, damaged, or does not fit the run."""


class FingerprintMismatch(CacheError):
    """The cache was made with another tokenizer / processor / parameters."""


class ResourceError(AlignTIError):
    """A failure that is not about one sample (disk full, permission, out of memory): one line naming the resource
    and what to do; finished work is kept and re-running the same command resumes."""
