//! Training utilities: optimiser groups, schedules, EMA, checkpoints.
