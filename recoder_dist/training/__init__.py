"""Training, by who runs it; data flows from the driver to the workers, never back up.

- ``driver/``: what the driver process does around a run: start or join Ray and launch the
  workers (``launcher``), refuse storage the workers cannot reach, take the run's lease, print
  the workers' progress, free a stopped run's resources.
- ``worker/``: what every worker (or this process, for a run on no workers) does: the epoch
  loop and where it runs (``worker_loop``, ``session``), the batches of an epoch, the step
  (replicated or sharded tables), the optimizers.
- ``evaluation/``: top k and the metrics' sums over users, of a whole model or of sharded
  tables; called by the worker loop and by ``Recoder.evaluate``, and calling neither.
- Here, what they share: the settings the driver sends (``config``), how many CPUs and threads
  a worker takes (``resources``), a batch on the device as a model reads it (``batch``), the
  sparse gradients' exchange between copies of a table (``sparse_sync``: the worker loop's
  replicated tables, and ``recoder_dist.sharded``'s replicas), model files (``snapshot``) and a
  run's checkpoint folders (``checkpoint``).

``tests/test_layout.py`` holds the parts to it over the package's import graph: evaluation
reaches neither the worker's part nor the driver's, the worker's part does not reach the
driver's, and the shared modules reach neither.
"""
