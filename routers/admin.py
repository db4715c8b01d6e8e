"""POST /v1/admin/reload: reread the registry and the API keys without a restart (app/reloading.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from app.reloading import Reload, Reloader, Told
from routers.deps import AdminKey
from routers.models import problems

router = APIRouter(prefix="/v1/admin")


class NameChanges(BaseModel):
    added: list[str]
    removed: list[str]
    changed: list[str]


class BackendChanges(BaseModel):
    opened: list[str] = Field(description="New or changed specs: a new client and fresh circuits")
    retired: list[str] = Field(
        description="Removed or changed specs: closed once the requests started before the reload have finished"
    )
    kept: list[str] = Field(description="Unchanged specs: the same client, connections and circuits")


class OtherWorkers(BaseModel):
    told: bool = Field(description="Whether the other workers were asked to reload (false: none, or not reachable)")
    detail: str


class ReloadReport(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "registry": "/etc/feature-gateway/registry.yaml",
                    "fingerprint": "3f0c9a1e5b7d2c44",
                    "generation": 2,
                    "changed": True,
                    "groups": {"added": ["consumer_promos"], "removed": [], "changed": ["consumer_live"]},
                    "services": {"added": [], "removed": [], "changed": []},
                    "on_demand": {"added": [], "removed": [], "changed": []},
                    "streams": {"added": [], "removed": [], "changed": []},
                    "backends": {"opened": ["promo"], "retired": [], "kept": ["hot", "bulk"]},
                    "keys": 3,
                    "worker": 4242,
                    "other_workers": {
                        "told": True,
                        "detail": "SIGHUP sent to the supervisor (pid 4240), which forwards it to every worker",
                    },
                }
            ]
        }
    )

    registry: str = Field(description="The registry file reread")
    fingerprint: str | None = Field(description="A hash of the registry and key files as loaded")
    generation: int = Field(description="This worker's registry generation now (1 at start, one more per reload)")
    changed: bool = Field(description="Whether anything of the registry changed (keys aside)")
    groups: NameChanges
    services: NameChanges
    on_demand: NameChanges
    streams: NameChanges
    backends: BackendChanges
    keys: int = Field(description="API keys configured now (0: authentication is off)")
    worker: int = Field(description="The pid of the worker that answered")
    other_workers: OtherWorkers


@router.post(
    "/reload",
    operation_id="reload_registry",
    tags=["admin"],
    summary="Reread the registry and the API keys, in every worker, without a restart",
    response_model=ReloadReport,
    responses=problems(
        status_422="The registry or the key file is invalid (type invalid-registry or invalid-key-config; `file` "
        "and `field` say where): nothing changed, the previous registry and keys keep serving"
    ),
)
async def reload_registry(request: Request, key: AdminKey) -> dict[str, Any]:
    """Needs the admin scope. Validates both files first; when valid, this worker serves them from its next request
    (requests in flight finish on the registry they started with), then the supervisor of a `--workers N` server
    is signalled, so every other worker reloads too (the answer says whether they were told). SIGHUP does the same."""
    reloader: Reloader = request.app.state.reloader
    by = "anyone (API keys are off)" if key is None else f"key {key.name}"
    done = await reloader.reload(force=True, why=f"POST /v1/admin/reload by {by}")
    return report(done, reloader.tell_other_workers())


def report(done: Reload, told: Told) -> dict[str, Any]:
    changes = done.changes
    assert changes is not None  # a forced reload is never skipped
    return {
        "registry": done.registry,
        "fingerprint": done.fingerprint,
        "generation": changes.generation,
        "changed": changes.changed,
        "groups": changes.groups.describe(),
        "services": changes.services.describe(),
        "on_demand": changes.on_demand.describe(),
        "streams": changes.streams.describe(),
        "backends": {"opened": list(changes.opened), "retired": list(changes.retired), "kept": list(changes.kept)},
        "keys": len(done.keys.keys),
        "worker": done.worker,
        "other_workers": {"told": told.told, "detail": told.detail},
    }
