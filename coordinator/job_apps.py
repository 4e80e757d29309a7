"""Jobs that run registered applications (docs/jobs.md, "Applications as jobs").

A job spec names ``app`` {name, version?, owner?} instead of a ``command``, with ``args``.
At submit (``pin``) the coordinator checks the app exists and the submitter may read it
(the rights of ``apps.show``), and stores in the spec a snapshot of that version: owner,
version (latest when omitted), kind and what it runs. App versions never change once
registered, so the snapshot is the app: matching (``app_of``, ``job_matching``) reads no
database, and removing the app later does not change queued jobs. The spec's binaries
and archive are data references of the job (``store.job_records._input_hashes``), which
keeps them from garbage collection while the job exists and lets its worker download them.

The stored spec gets its ``command`` too: ``binaries`` run ``./.xcloud-app/NAME ARGS``
(the worker's binary is added as an executable input at assignment, ``app_input``);
``command`` apps run their command with the arguments; ``image`` apps run the arguments in
the image with the docker executor; ``image_archive`` apps too, in the image their
``docker save`` archive holds: the snapshot names the archive (``sha256``, ``size``), and
the worker fetches it through its input cache and ``docker load``s it once
(worker/image_archives.py) before opening the attempt's container with that image.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from typing import Any

from coordinator.handling import Refusal
from coordinator.store.apps import LATEST, AppRecord, Binary, Unresolvable, resolve

APP_DIR = ".xcloud-app"
COMMAND_MAX = 65536  # jobs.submit.json#/definitions/job_spec command


def input_name(name: str) -> str:
    """Where an app's binary is placed in the job's work dir."""
    return f"{APP_DIR}/{name}"


def _joined(head: str, args: list[str]) -> str:
    return " ".join([head, *(shlex.quote(a) for a in args)]) if head else " ".join(
        shlex.quote(a) for a in args)


def _docker_requirements(spec: Mapping[str, Any], image: str | None, runs: str,
                         args: list[str]) -> dict[str, Any]:
    """The requirements of an app that runs in docker (``image``, or None for an archive's
    image, known only once a worker loads it): the docker executor, no other image."""
    if not args:
        raise Refusal("invalid", f"{runs}: give the command to run in it as the arguments")
    req = dict(spec.get("requirements") or {})
    if req.get("executor") not in (None, "docker") or req.get("image") not in (None, image):
        raise Refusal("invalid", f"{runs}: give no other executor or image")
    req["executor"] = "docker"
    if image is not None:
        req["image"] = image
    return req


def pin(store: Any, submitter: str, spec: dict[str, Any], *, admin: bool,
        index: int) -> dict[str, Any]:
    """The spec to store for one submitted job: unchanged without ``app``, else with the
    app's snapshot and the command filled in; a Refusal says what is wrong."""
    where = f"job {index}"
    if "app" not in spec:
        if spec.get("args"):
            raise Refusal("invalid", f"{where}: args go with an app (--app), not a command")
        if not spec.get("command"):
            raise Refusal("invalid", f"{where}: give a command or an app")
        return spec
    if spec.get("command"):
        raise Refusal("invalid", f"{where}: give a command or an app, not both")
    wanted = spec["app"]
    name = str(wanted["name"])
    owner = str(wanted.get("owner") or submitter)
    version = wanted.get("version")
    versions: list[AppRecord] = store.app_versions(owner, name)
    app = versions[0] if versions and version in (None, LATEST) else next(
        (a for a in versions if a.version == version), None)
    whose = "you have" if owner == submitter else f"{owner} has"
    what = f"app {name}" + (f" version {version}" if version not in (None, LATEST) else "")
    if app is None:
        raise Refusal("not_found", f"{where}: {whose} no {what} (`xcloud app list`)")
    if not admin and not app.readable_by(submitter):  # as data: not shared, not there
        raise Refusal("not_found", f"{where}: {whose} no {what} shared with {submitter}")
    args = [str(a) for a in spec.get("args") or ()]
    snapshot: dict[str, Any] = {"name": app.name, "version": app.version,
                                "owner": app.owner, "kind": app.kind}
    pinned = {**spec, "app": snapshot}
    if app.kind == "binaries":
        if any(i.get("name") == input_name(app.name) for i in spec.get("inputs") or ()):
            raise Refusal("invalid", f"{where}: the input name {input_name(app.name)} is "
                          "where the app's binary goes")
        snapshot["binaries"] = {b.platform: b.sha256 for b in app.binaries}
        command = _joined(f"./{shlex.quote(input_name(app.name))}", args)
    elif app.kind == "command":
        snapshot["command"] = app.command
        command = _joined(str(app.command), args)
    elif app.kind == "image_archive":  # as image, in the image the worker loads
        assert app.sha256 is not None
        snapshot.update(sha256=app.sha256, size=int(app.size or 0))
        pinned["requirements"] = _docker_requirements(
            spec, None, f"{where}: {app.name} runs in the image of its archive", args)
        command = _joined("", args)
    else:  # image: the arguments run in the image, with the docker executor
        assert app.image is not None
        snapshot["image"] = app.image
        pinned["requirements"] = _docker_requirements(
            spec, app.image, f"{where}: {app.name} runs in docker image {app.image}", args)
        command = _joined("", args)
    if len(command) > COMMAND_MAX:
        raise Refusal("invalid", f"{where}: the command with its arguments is over "
                      f"{COMMAND_MAX} characters")
    pinned["command"] = command
    return pinned


def app_of(spec: Mapping[str, Any]) -> AppRecord | None:
    """The app a stored spec runs (its snapshot), or None for a plain command job."""
    app = spec.get("app") if isinstance(spec, Mapping) else None
    if not isinstance(app, Mapping) or not isinstance(app.get("kind"), str):
        return None
    found = app.get("binaries")
    binaries: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    return AppRecord(id="", owner=str(app.get("owner") or ""), name=str(app.get("name")),
                     version=str(app.get("version")), kind=str(app["kind"]),
                     binaries=tuple(Binary(str(p), str(s), 0) for p, s in binaries.items()),
                     image=app.get("image"), command=app.get("command"))


def app_reason(caps: Mapping[str, Any], app: AppRecord | None) -> str | None:
    """Why a worker with ``caps`` cannot run the job's app, or None."""
    if app is None:
        return None
    try:
        resolve(app, caps)
    except Unresolvable as err:
        return str(err)
    return None


def app_input(spec: Mapping[str, Any], caps: Mapping[str, Any]) -> dict[str, Any] | None:
    """The executable input {name, sha256, exec} of a binaries app for this worker."""
    app = app_of(spec)
    if app is None or app.kind != "binaries":
        return None
    chosen = resolve(app, caps)
    return {"name": input_name(app.name), "sha256": str(chosen.sha256), "exec": True}

