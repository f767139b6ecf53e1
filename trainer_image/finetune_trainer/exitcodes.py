"""Exit codes of `python -m finetune_trainer`, shared with the operator."""

from enum import IntEnum


class ExitCode(IntEnum):
    SUCCEEDED = 0
    FAILED = 1  # unexpected error
    INVALID_CONFIG = 2
    SUCCESS_CRITERIA_NOT_MET = 3
    DATA_REFUSED = 4  # small-data rule, failed tokenization checks, bad data
    CHECKPOINT_RESTORE_FAILED = 5
    DIVERGED = 6  # non-finite or spiking loss: a retry from the last checkpoint would diverge again
    STORE_REFUSED = 7  # the object store refused the credentials or access, or has no such bucket
    PREEMPTED_CHECKPOINTED = 75  # SIGTERM and a committed checkpoint: resume, not a failure
    PREEMPTED_OUTSIDE_TRAINING = 76  # SIGTERM while preparing, loading or evaluating: nothing new to save
