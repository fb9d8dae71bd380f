"""Training, by who runs it; data flows from the driver to the workers, never back up.

- ``driver/``: what the driver process does around a run: start or join Ray and launch the
  workers (``launcher``), refuse storage the workers cannot reach, take the run's lease, print
  the workers' progress, free a stopped run's resources.
- ``worker/``: what every worker (or this process, for a run on no workers) does: the epoch
  loop and where it runs (``worker_loop``, ``session``), the batches of an epoch, the step
  (replicated or sharded tables), the optimizers and the sparse gradients' exchange.
- ``evaluation/``: top k and the metrics' sums over users, of a whole model or of sharded
  tables; called by the worker loop and by ``Recoder.evaluate``, and calling neither.
- Here, what both sides share: the settings the driver sends (``config``), how many CPUs and
  threads a worker takes (``resources``), model files (``snapshot``) and a run's checkpoint
  folders (``checkpoint``).
"""
