"""Placement groups a stopped trial leaves behind, released by the sweep's driver.

When ASHA stops a trial, Tune ends the trial's actor, and with it the Ray Train controller that
actor owns. The controller's placement group (its workers' CPUs) outlives it: a non-detached
placement group lasts until its creator actor AND its job are gone, and the job (the `loraflow tune`
driver) is still running. Ray Train V2 starts a detached `PlacementGroupCleaner` for this, but it
asks the state API (the dashboard) whether the controller is alive and, without a reachable
dashboard (a cluster started without one, or another cluster's dashboard on the port), never
decides: each stopped trial would then hold its workers' CPUs until the sweep ends, and the next
trials, then evaluate, would wait for CPUs forever. Measured on Ray 2.60 (workflows/tune tests).

So the driver asks the GCS itself: a placement group of this job made by an actor that is now dead
is orphaned (nothing can schedule into it any more) and is removed. Groups the driver made (Tune's
own, one per running trial) have no creator actor and are never touched.
"""

from __future__ import annotations

import logging
import time

logger = logging.getLogger(__name__)


def release_orphaned_placement_groups() -> int:
    """Remove this job's placement groups whose creator actor is dead; returns how many. Never
    raises: a failure (a Ray internal that moved) is logged and leaves the groups as they were."""
    return _release()[0]


def release_after_sweep(timeout_s: float = 30.0) -> None:
    """Once no trial runs: wait (up to `timeout_s`) for the last controllers to die, releasing
    their placement groups, so that evaluate finds every CPU free."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        released, alive = _release()
        if not alive:
            return
        time.sleep(0.5)


def _release() -> tuple[int, int]:
    """(groups removed, this job's groups whose creator still lives)."""
    try:
        import ray
        from ray._private.state import state
        from ray._raylet import PlacementGroupID
        from ray.core.generated import gcs_pb2
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        job = ray.get_runtime_context().get_job_id()
        accessor = state._connect_and_get_accessor()
        released = alive = 0
        for pg_hex, info in ray.util.placement_group_table().items():
            if info["state"] != "CREATED":
                continue
            pg_id = PlacementGroupID(bytes.fromhex(pg_hex))
            data = gcs_pb2.PlacementGroupTableData.FromString(accessor.get_placement_group_info(pg_id))
            creator = data.creator_actor_id
            # Only groups an actor made (a Train controller): the driver's own (Tune's trial groups)
            # have a nil creator, which the GCS reports as dead.
            if data.is_detached or data.creator_job_id.hex() != job or not creator.strip(b"\xff"):
                continue
            if not data.creator_actor_dead:
                alive += 1
                continue
            remove_placement_group(PlacementGroup(pg_id))
            released += 1
        return released, alive
    except Exception as e:  # a private API: never fail the sweep over it
        logger.warning("could not release the placement groups of stopped trials: %s", e)
        return 0, 0
