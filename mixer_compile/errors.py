"""The exception types a user can see.

Every error caused by user input (a spec, a checkpoint, a target, an artifact) is a
MixerCompileError; the CLI prints it as one line and exits non-zero. Anything else that
escapes is a bug in mixer-compile and keeps its traceback.
"""

import difflib
import errno

# what the machine, not our code, gets wrong (any path we are given can meet these), and the fix
_NO_SPACE, _NO_ACCESS = "free some space there or write elsewhere", "choose a path you may use"
MACHINE_FIXES = {errno.ENOSPC: _NO_SPACE, errno.EDQUOT: _NO_SPACE, errno.EACCES: _NO_ACCESS, errno.EPERM: _NO_ACCESS,
                 errno.ENAMETOOLONG: "use a shorter path", errno.ELOOP: "fix the symbolic link",
                 errno.EROFS: "write to a file system that is not read-only"}


class MixerCompileError(Exception):
    """Base class: a one-line message that names the problem and, where possible, the fix."""


class SpecError(MixerCompileError):
    """An invalid model spec (unknown preset, bad field, image not divisible by patch...)."""


class WeightsError(MixerCompileError):
    """A checkpoint that cannot be mapped onto the spec (missing, extra or mis-shaped keys)."""


class TargetError(MixerCompileError):
    """An unknown or unsupported compilation target."""


class ValidationError(MixerCompileError):
    """A compiled module whose output disagrees with the reference forward pass."""


class ArtifactError(MixerCompileError):
    """An artifact directory that is missing, incomplete or cannot be loaded here."""


class TuningError(MixerCompileError):
    """A tuning database or tuning run that cannot be used (corrupt file, no tasks...)."""


class PerformanceWarning(UserWarning):
    """Code that runs, but slower on this machine than a build for it would."""


class InputError(MixerCompileError, ValueError):
    """Images a loaded model cannot take (shape, batch, dtype, not an array); also a ValueError,
    so that serving code catching bad requests as ValueError catches these."""


def did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """"; did you mean 'X'?" for the closest of `choices` to a misspelt name, else ""."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""
