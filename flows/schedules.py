"""Scheduled gendag commands: Prefect deployments on a cron or interval schedule.

    gendag serve --cron "0 3 * * *" --name nightly -- retrain models:/gendag-fm-digits

deploys `scheduled-command` with that command as its parameter and serves it: the Prefect
server's scheduler creates a flow run at every tick, and the serving process runs it as
`gendag <command>` (a process of its own, with the workspace and the services' addresses of
the serving one), so a scheduled run is exactly what the same command typed by hand does. Its
output goes to the flow run's log; a non-zero exit fails the flow run. Schedules need a real
Prefect server (`PREFECT_API_URL`): the embedded one does not run the scheduler.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta, timezone

from prefect import flow, get_run_logger

from tasks.infra import RunError, home

#: The commands a schedule may run: the graphs, retraining, re-sampling.
SCHEDULABLE = ("run", "retrain", "sample", "list")


def require_server() -> str:
    """The Prefect server's API address; schedules cannot run on the embedded server."""
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        raise RunError("schedules need a Prefect server: start one (`gendag services up`) and set "
                       "PREFECT_API_URL (e.g. `source .gendag/services/env.sh`)")
    return url


def check_command(command: list[str]) -> None:
    if not command or command[0] not in SCHEDULABLE:
        got = command[0] if command else "nothing"
        raise RunError(f"the scheduled command: got {got!r}; expected one of {', '.join(SCHEDULABLE)} "
                       "after `--`, e.g. `gendag serve --cron '0 3 * * *' -- retrain models:/<name>`")


@flow(name="scheduled-command", validate_parameters=False)
def scheduled_command(command: list[str]) -> int:
    """Run `gendag <command>` in the workspace; its output is this flow run's log."""
    logger = get_run_logger()
    logger.info("gendag %s", " ".join(command))
    done = subprocess.run([sys.executable, "-m", "flows.cli", *command], cwd=home(), capture_output=True, text=True)
    for line in (done.stdout + done.stderr).splitlines():
        logger.info(line)
    if done.returncode:
        raise RuntimeError(f"gendag {' '.join(command)} exited with {done.returncode}")
    return done.returncode


def serve(name: str, command: list[str], cron: str | None, every: float | None) -> None:
    """Deploy `command` on its schedule and run its flow runs until interrupted."""
    scheduled_command.serve(name=name, cron=cron, interval=timedelta(seconds=every) if every else None,
                            parameters={"command": command}, description=f"gendag {' '.join(command)}",
                            tags=["gendag", command[0]], pause_on_shutdown=False)


def list_schedules() -> list[dict]:
    """Every deployment of `scheduled-command`: name, command, schedule, next and last run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterId, FlowFilter, FlowFilterName,
                                                FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def read() -> list[dict]:
        async with get_client() as client:
            deployments = await client.read_deployments(flow_filter=FlowFilter(name=FlowFilterName(any_=["scheduled-command"])))
            rows = []
            for d in sorted(deployments, key=lambda d: d.name):
                mine = DeploymentFilter(id=DeploymentFilterId(any_=[d.id]))
                upcoming = await client.read_flow_runs(
                    deployment_filter=mine, sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=1,
                    flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))))
                last = await client.read_flow_runs(
                    deployment_filter=mine, sort=FlowRunSort.END_TIME_DESC, limit=1,
                    flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                        any_=[StateType.COMPLETED, StateType.FAILED, StateType.CRASHED]))))
                rows.append({
                    "name": d.name,
                    "command": "gendag " + " ".join(d.parameters.get("command", [])),
                    "schedule": ", ".join(_describe(s.schedule) for s in d.schedules) or "-",
                    "next": _when(upcoming[0].expected_start_time) if upcoming else "-",
                    "last": f"{last[0].state_name} {_when(last[0].end_time)}" if last else "-",
                    "paused": bool(d.paused),
                })
            return rows

    return run_coro_as_sync(read())


def _when(moment) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _describe(schedule) -> str:
    if getattr(schedule, "cron", None):
        return f"cron {schedule.cron}"
    if getattr(schedule, "interval", None):
        return f"every {schedule.interval.total_seconds():g} s"
    return type(schedule).__name__
