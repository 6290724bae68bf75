"""Deployments of prefect.yaml as values, so `lrflow serve` runs the very same definitions."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from flows.config import TrainConfig
from flows.errors import DataError

TRAIN_ENTRYPOINT = "flows/train.py:train"


@dataclass(frozen=True)
class ScheduleSpec:
    cron: str
    timezone: str | None
    active: bool


@dataclass(frozen=True)
class DeploymentSpec:
    """One entry of ``deployments:`` in prefect.yaml, its parameters validated."""

    name: str
    entrypoint: str
    parameters: dict[str, Any]
    schedules: tuple[ScheduleSpec, ...]
    concurrency_limit: int | None
    description: str | None
    tags: tuple[str, ...]


def read_deployments(path: Path) -> list[dict[str, Any]]:
    """The raw ``deployments:`` entries of a prefect.yaml (YAML anchors resolved)."""
    import yaml  # PyYAML comes with Prefect

    if not path.is_file():
        raise DataError("no such file (run from the repository root or pass --file)", path=path)
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise DataError(f"not valid YAML: {error}", path=path) from None
    deployments = (document or {}).get("deployments")
    if not isinstance(deployments, list):
        raise DataError("has no 'deployments:' list", path=path)
    return deployments


def train_deployment(path: Path, name: str) -> DeploymentSpec:
    """The train deployment ``name`` of ``path``, with its parameters checked by TrainConfig."""
    # Deployment names are unique per flow (train/nightly, score/nightly): look among
    # the train flow's.
    deployments = read_deployments(path)
    entries = {e.get("name"): e for e in deployments if e.get("entrypoint") == TRAIN_ENTRYPOINT}
    if name not in entries:
        known = ", ".join(sorted(str(n) for n in entries))
        others = sorted({str(e.get("entrypoint")) for e in deployments if e.get("name") == name})
        found_elsewhere = f"; {name!r} runs {', '.join(others)}" if others else ""
        raise DataError(
            f"no train deployment named {name!r} (found: {known}){found_elsewhere}", path=path
        )
    entry = entries[name]
    parameters = entry.get("parameters") or {}
    try:
        TrainConfig.model_validate(parameters.get("config"))
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in error.errors()
        )
        raise DataError(f"deployment {name!r}: invalid config: {problems}", path=path) from None
    limit = entry.get("concurrency_limit")
    if isinstance(limit, dict):
        limit = limit.get("limit")
    return DeploymentSpec(
        name=name,
        entrypoint=entry["entrypoint"],
        parameters=parameters,
        schedules=tuple(
            ScheduleSpec(
                cron=str(schedule["cron"]),
                timezone=schedule.get("timezone"),
                active=bool(schedule.get("active", True)),
            )
            for schedule in entry.get("schedules") or []
            if "cron" in schedule
        ),
        concurrency_limit=limit,
        description=entry.get("description"),
        tags=tuple(entry.get("tags") or ()),
    )
