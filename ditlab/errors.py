"""The library's exceptions. Each carries the one line a user needs to fix the problem; the library raises
them and only the commands (through `ditlab.cli.command`) turn them into that line and an exit code.

This module is the bottom of the package: it imports nothing from it."""

PREEMPTED_EXIT = 75  # stopped by a signal after saving a checkpoint: rerun the same command to continue
DIVERGED_EXIT = 3  # the loss became NaN/inf or blew up: not worth requeueing


class DitlabError(Exception):
    """A failure the user can act on. str(error) is the whole message; `exit_code` is the command's status."""

    exit_code = 1


class UsageError(DitlabError, ValueError):
    """Flags or settings that cannot work together, or a value out of range."""


class InputError(DitlabError, FileNotFoundError):
    """A file, folder or checkpoint that is missing, unreadable or of the wrong kind."""


class CheckpointError(InputError):
    """A checkpoint that cannot be read, or does not fit the model or run it is meant for."""


class JobError(DitlabError):
    """A subprocess (a training run, a sampling job) of a study failed; the message ends with its log's tail."""


class Preempted(DitlabError):
    """Stopped by a signal after the checkpoint was saved."""

    exit_code = PREEMPTED_EXIT


class Diverged(DitlabError):
    """The training loss became non-finite or blew up."""

    exit_code = DIVERGED_EXIT
