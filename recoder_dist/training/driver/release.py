"""Freeing the CPUs (and GPUs) of Ray Train runs whose controller was killed.

A Ray Train run reserves its workers' resources in a placement group, which its controller
removes when the run ends. When the controller is killed instead (Ray Tune stopping a trial:
Tune ends the trial's actor, which owns the controller), nothing in the run removes it, and the
group outlives the run until the job ends: Ray scopes a group created by a non-detached actor
to the job. Ray Train leaves it to a detached ``PlacementGroupCleaner`` actor, which asks the
state API whether the controller lives; that actor finds the cluster by looking for local Ray
instances and gives up when it finds several ("Found multiple active Ray instances"), so on a
machine that runs two Ray instances the group stays, and the next trial waits for its CPUs
forever.

This module removes such groups itself, through public Ray APIs: a placement group that this
job created, that is still held, and whose Ray Train workers are all dead belongs to no run.
A running run's group holds live workers (or none yet, while they start), and a run that
restarts its worker group removes the old group itself, so neither is touched. The state API
is asked at this process's own cluster (``ray.get_runtime_context().gcs_address``), not at
whatever instance a search of the machine finds first.
"""

from __future__ import annotations

import logging
import time

import ray
from ray.util.placement_group import PlacementGroup, remove_placement_group

logger = logging.getLogger(__name__)

# The actor class of Ray Train's workers (ray.train.v2); tests/test_release.py fails when a Ray
# upgrade renames it, since this module would then find no run's workers.
TRAIN_WORKER_CLASS = "RayTrainWorker"


def train_groups() -> dict[str, bool]:
    """This job's placement groups that hold (or held) Ray Train workers and are not removed,
    by hex id: whether any of their workers lives. A group whose workers are all dead belongs
    to no run (``release_abandoned_train_groups``).

    Raises:
        RuntimeError: Ray is not initialized.
        ray.util.state.exception.RayStateApiException: the state API (served by the
            dashboard) does not answer.
    """
    from ray.util.state import list_actors, list_placement_groups

    if not ray.is_initialized():
        raise RuntimeError("Ray is not initialized")
    context = ray.get_runtime_context()
    address = context.gcs_address
    groups = list_placement_groups(
        address=address,
        filters=[("creator_job_id", "=", context.get_job_id()), ("state", "!=", "REMOVED")],
        detail=True,
        raise_on_missing_output=False,
    )
    held = {g.placement_group_id for g in groups if not g.is_detached}
    if not held:
        return {}
    workers = list_actors(
        address=address,
        filters=[("class_name", "=", TRAIN_WORKER_CLASS), ("job_id", "=", context.get_job_id())],
        detail=True,
        limit=10_000,  # the state API's most
        raise_on_missing_output=False,
    )
    alive: dict[str, bool] = {}
    for worker in workers:
        group = worker.placement_group_id
        if group in held:
            alive[group] = alive.get(group, False) or worker.state != "DEAD"
    return alive


def release_abandoned_train_groups() -> list[str]:
    """Removes this job's placement groups whose Ray Train workers are all dead (a stopped
    run's); returns their hex ids.

    A group that its controller removes at the same moment is no error: removing a removed
    group is a no-op for Ray.
    """
    released = sorted(group for group, alive in train_groups().items() if not alive)
    for group_id in released:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(group_id)))
        logger.info("released placement group %s of a stopped Ray Train run", group_id)
    return released


def release_until_none_held(timeout_s: float, poll_s: float = 0.5) -> dict[str, bool]:
    """Releases the groups that stopped runs left, until this job's Ray Train runs hold no
    placement group (a stopped run's workers die a moment after its controller) or
    ``timeout_s`` passes; returns the groups still held then (empty when none)."""
    deadline = time.monotonic() + timeout_s
    while True:
        release_abandoned_train_groups()
        held = train_groups()
        if not held or time.monotonic() >= deadline:
            return held
        time.sleep(poll_s)
