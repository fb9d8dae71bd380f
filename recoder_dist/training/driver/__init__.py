"""The driver's side of a run: launching it on Ray Train (or in this process), checking its
storage and lease, printing its progress, and releasing a stopped run's resources."""
