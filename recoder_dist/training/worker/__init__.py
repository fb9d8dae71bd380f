"""What each training worker runs: the epoch loop, its batches, the step and the optimizers."""
