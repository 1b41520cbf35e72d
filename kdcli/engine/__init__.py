"""The training engine: fit loop, evaluation, schedules and pickle-free checkpoints."""
