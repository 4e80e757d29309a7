"""Applications: what a job runs (docs/data.md, "Applications").

An application version is one of four kinds:

- ``binaries``: one executable per platform (``linux/amd64`` -> a data object's SHA-256),
  XtremWeb-HEP's "one URI per OS/CPU";
- ``image``: a Docker image the workers hold (no registry is reachable on many grids);
- ``image_archive``: a ``docker save`` tar stored as a data object, which workers load;
- ``command``: a plain command line.

Apps belong to an owner and carry the rights data objects have (``private``, ``shared``
with named principals, ``public``). Versions are unique per (owner, name); ``latest`` is
the highest version (numeric parts compared as numbers: 1.10 > 1.9 > 1.2.3 > 1). The
data objects an app names get a reference of kind ``app`` (``ref_id`` = the app's id),
so garbage collection keeps them while the app exists; removing the app drops them.

``resolve(app, caps)`` is a pure function for the jobs scheduler: what a worker with
this capability document would run (the binary of its OS and architecture, the image,
the archive to load, or the command), or ``Unresolvable`` with the reason.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from coordinator.errors import AlreadyExists, CoordinatorError, InvalidArgument, NotFound
from coordinator.models import APP_NAME_MAX, APP_VERSION_MAX, ID_MAX
from coordinator.store.data import ACCESS, valid_sha256
from coordinator.store.engine import StoreBase, op
from coordinator.store.values import checked_text, dumps, loads, now_or

log = logging.getLogger(__name__)

APP_KINDS = ("binaries", "image", "image_archive", "command")
MAX_PLATFORMS = 16
MAX_SHARE = 64
IMAGE_MAX = 256
COMMAND_MAX = 4096
LATEST = "latest"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
PLATFORM_RE = re.compile(r"^[a-z0-9_]{1,32}/[a-z0-9_]{1,32}(/[a-z0-9]{1,16})?$")

# platform.machine() and Docker spellings -> Docker's (GOARCH[/variant]).
_ARCH = {
    "x86_64": "amd64", "amd64": "amd64", "x64": "amd64",
    "aarch64": "arm64", "arm64": "arm64", "armv8l": "arm64",
    "armv7l": "arm/v7", "armv7": "arm/v7", "armhf": "arm/v7",
    "armv6l": "arm/v6", "armv6": "arm/v6", "armel": "arm/v6",
    "i386": "386", "i686": "386", "x86": "386", "386": "386",
    "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64",
}


class Unresolvable(CoordinatorError):
    """This app cannot run on this worker (no binary for its platform, no docker, ...)."""

    code = "unsupported"


def normalize_platform(text: str) -> str:
    """``Linux/x86_64`` -> ``linux/amd64``; ``linux/armv7l`` -> ``linux/arm/v7``.

    Raises InvalidArgument for something that is not ``OS/ARCH[/VARIANT]``."""
    parts = text.strip().lower().split("/")
    if len(parts) == 2:
        parts = [parts[0], *_ARCH.get(parts[1], parts[1]).split("/")]
    platform = "/".join(parts)
    if not PLATFORM_RE.match(platform):
        raise InvalidArgument(f"a platform is OS/ARCH such as linux/amd64, not {text!r:.80}")
    return platform


def worker_platform(caps: Mapping[str, Any]) -> str | None:
    """The platform of a worker's capability document (``host.os``, ``host.arch``)."""
    host = caps.get("host")
    if not isinstance(host, Mapping):
        return None
    os_name, arch = host.get("os"), host.get("arch")
    if not isinstance(os_name, str) or not isinstance(arch, str) or not os_name or not arch:
        return None
    try:
        return normalize_platform(f"{os_name}/{arch}")
    except InvalidArgument:
        return None


def version_key(version: str) -> tuple[tuple[int, int, str], ...]:
    """Order of versions: numeric parts as numbers (1.10 > 1.9 > 1.2.3 > 1), a word below
    the end of the version (2.0 > 2.0-rc1)."""
    parts = tuple((2, int(p), "") if p.isdigit() else (0, 0, p)
                  for p in re.split(r"[._+-]", version))
    return (*parts, (1, 0, ""))


def checked_name(name: Any) -> str:
    checked_text(name, "app name", APP_NAME_MAX)
    if not NAME_RE.match(name):
        raise InvalidArgument(f"an app name is letters, digits, '.', '_' and '-', starting "
                              f"with a letter or digit, not {name!r:.80}")
    return str(name)


def checked_version(version: Any) -> str:
    checked_text(version, "app version", APP_VERSION_MAX)
    if not VERSION_RE.match(version) or version == LATEST:
        raise InvalidArgument(f"a version is letters, digits, '.', '_', '+' and '-' (and "
                              f"not {LATEST!r}), not {version!r:.80}")
    return str(version)


@dataclass(frozen=True, slots=True)
class Binary:
    platform: str
    sha256: str
    size: int


@dataclass(frozen=True, slots=True)
class AppRecord:
    """One application version."""

    id: str
    owner: str
    name: str
    version: str
    kind: str
    binaries: tuple[Binary, ...] = ()
    image: str | None = None
    sha256: str | None = None  # image_archive
    size: int | None = None  # image_archive
    command: str | None = None
    access: str = "private"
    share: tuple[str, ...] = ()
    created_at: float = 0.0

    def readable_by(self, principal: str) -> bool:
        return (principal == self.owner or self.access == "public"
                or (self.access == "shared" and principal in self.share))

    def data_objects(self) -> list[str]:
        """The SHA-256 of every data object this app names."""
        shas = [b.sha256 for b in self.binaries]
        if self.sha256:
            shas.append(self.sha256)
        return sorted(set(shas))


@dataclass(frozen=True, slots=True)
class Resolution:
    """What a worker runs for an app: ``kind`` and, by kind, the binary (``platform``,
    ``sha256``, ``size``), the ``image``, the archive (``sha256``, ``size``) or the
    ``command``."""

    kind: str
    platform: str | None = None
    sha256: str | None = None
    size: int | None = None
    image: str | None = None
    command: str | None = None


def _has_image(caps: Mapping[str, Any], image: str) -> bool:
    docker = caps.get("docker")
    images = docker.get("images") if isinstance(docker, Mapping) else None
    if not isinstance(images, list):
        return False
    wanted = {image} if ":" in image.rsplit("/", 1)[-1] or "@" in image else {
        image, f"{image}:latest"}
    return any(isinstance(i, str) and i in wanted for i in images)


def image_refusal(caps: Mapping[str, Any], image: str | None) -> str | None:
    """Why a worker with ``caps`` would refuse to run ``image`` (None: an image known
    only once an archive is loaded), or None. A worker whose docker document says
    ``image_override`` false runs only its ``default_image``, compared as its executor
    does (worker/executors/docker/container.py: the exact string); one that does not
    say runs any."""
    docker = caps.get("docker")
    if not isinstance(docker, Mapping) or docker.get("image_override") is not False:
        return None
    own = docker.get("default_image")
    if image is not None and isinstance(own, str) and image == own:
        return None
    return (f"it runs only its own image {own}" if isinstance(own, str)
            else "it runs only its own image") + " (docker_allow_image_override is off)"


def resolve(app: AppRecord, caps: Mapping[str, Any]) -> Resolution:
    """What a worker with capability document ``caps`` runs for ``app``.

    ``binaries``: the binary of the worker's platform (``host.os``/``host.arch``,
    normalised: x86_64 is amd64, aarch64 arm64), else the one without the variant
    (``linux/arm`` for ``linux/arm/v7``); ``image``: the worker needs the docker
    executor and the image; ``image_archive``: the docker executor; both: a worker that
    may run them (``image_refusal``); ``command``: any worker. Pure: no database, no
    bus. Raises ``Unresolvable`` with the reason.
    """
    executors = caps.get("executors")
    has_docker = isinstance(executors, list) and "docker" in executors
    if app.kind == "binaries":
        platform = worker_platform(caps)
        if platform is None:
            raise Unresolvable("the worker does not say its OS and architecture")
        by_platform = {b.platform: b for b in app.binaries}
        binary = by_platform.get(platform) or by_platform.get(
            "/".join(platform.split("/")[:2]))
        if binary is None:
            have = ", ".join(sorted(by_platform)) or "none"
            raise Unresolvable(f"{app.name} {app.version} has no binary for {platform} "
                               f"(it has {have})")
        return Resolution("binaries", platform=binary.platform, sha256=binary.sha256,
                          size=binary.size)
    if app.kind in ("image", "image_archive") and not has_docker:
        raise Unresolvable(f"{app.name} {app.version} runs in docker, and the worker has "
                           "no docker executor")
    if app.kind == "image":
        assert app.image is not None
        if not _has_image(caps, app.image):
            raise Unresolvable(f"the worker does not hold image {app.image}")
        refused = image_refusal(caps, app.image)
        if refused:
            raise Unresolvable(f"{app.name} {app.version} runs in image {app.image}, and "
                               f"{refused}")
        return Resolution("image", image=app.image)
    if app.kind == "image_archive":
        refused = image_refusal(caps, None)
        if refused:
            raise Unresolvable(f"{app.name} {app.version} runs in the image of its "
                               f"archive, and {refused}")
        return Resolution("image_archive", sha256=app.sha256, size=app.size)
    if app.kind == "command":
        return Resolution("command", command=app.command)
    raise Unresolvable(f"unknown app kind {app.kind!r}")


def can_run(app: AppRecord, caps: Mapping[str, Any]) -> bool:
    try:
        resolve(app, caps)
    except Unresolvable:
        return False
    return True


def _record(row: Any) -> AppRecord:
    spec = loads(row.spec, {})
    binaries = tuple(sorted(
        (Binary(str(p), str(b.get("sha256")), int(b.get("size") or 0))
         for p, b in (spec.get("binaries") or {}).items() if isinstance(b, dict)),
        key=lambda b: b.platform))
    share = loads(row.share, [])
    size = spec.get("size")
    return AppRecord(id=row.id, owner=row.owner, name=row.name, version=row.version,
                     kind=row.kind, binaries=binaries, image=spec.get("image"),
                     sha256=spec.get("sha256"), size=None if size is None else int(size),
                     command=spec.get("command"), access=row.access,
                     share=tuple(str(p) for p in share if isinstance(p, str)),
                     created_at=row.created_at)


def checked_spec(kind: str, binaries: Sequence[Binary], image: str | None,
                 sha256: str | None, size: int | None, command: str | None
                 ) -> dict[str, Any]:
    """The stored spec, checked: exactly what ``kind`` needs, nothing else
    (InvalidArgument otherwise)."""
    if kind not in APP_KINDS:
        raise InvalidArgument(f"app kind must be one of {', '.join(APP_KINDS)}, not {kind!r}")
    given = {"binaries": bool(binaries), "image": image is not None,
             "image_archive": sha256 is not None, "command": command is not None}
    extra = [k for k, v in given.items() if v and k != kind]
    if extra or not given[kind]:
        raise InvalidArgument(f"an app of kind {kind} needs its {kind.replace('_', ' ')} "
                              "and nothing else" + (f" (also got {', '.join(extra)})"
                                                    if extra else ""))
    if kind == "binaries":
        if len(binaries) > MAX_PLATFORMS:
            raise InvalidArgument(f"an app has at most {MAX_PLATFORMS} platforms")
        out: dict[str, Any] = {}
        for b in binaries:
            platform = normalize_platform(b.platform)
            if platform in out:
                raise InvalidArgument(f"two binaries for {platform}")
            if not valid_sha256(b.sha256):
                raise InvalidArgument("sha256 must be 64 lowercase hex digits")
            out[platform] = {"sha256": b.sha256, "size": int(b.size)}
        return {"binaries": out}
    if kind == "image":
        return {"image": checked_text(image, "image", IMAGE_MAX)}
    if kind == "image_archive":
        if not valid_sha256(sha256):
            raise InvalidArgument("sha256 must be 64 lowercase hex digits")
        return {"sha256": sha256, "size": int(size or 0)}
    return {"command": checked_text(command, "command", COMMAND_MAX)}


class AppStore(StoreBase):
    """Applications and the data references that keep their files."""

    @op
    def add_app(self, owner: str, name: str, version: str, kind: str, *,
                binaries: Sequence[Binary] = (), image: str | None = None,
                sha256: str | None = None, size: int | None = None,
                command: str | None = None, access: str = "private",
                share: Sequence[str] = (), now: float | None = None) -> AppRecord:
        """Register a version; its data objects must exist (NotFound) and get an app
        reference; a version already registered by this owner is AlreadyExists."""
        checked_text(owner, "owner", ID_MAX)
        checked_name(name)
        checked_version(version)
        spec = checked_spec(kind, binaries, image, sha256, size, command)
        if access not in ACCESS:
            raise InvalidArgument(f"access must be one of {', '.join(ACCESS)}")
        names = sorted({checked_text(p, "principal id", ID_MAX) for p in share})
        if len(names) > MAX_SHARE:
            raise InvalidArgument(f"an app is shared with at most {MAX_SHARE} principals")
        if access != "shared":
            names = []
        t = now_or(now)
        App, Obj, Ref = self.models.App, self.models.DataObject, self.models.DataRef
        app_id = uuid.uuid4().hex[:16]
        shas = sorted({b["sha256"] for b in spec.get("binaries", {}).values()}
                      | ({spec["sha256"]} if "sha256" in spec else set()))
        with self.db.atomic():
            if App.select().where((App.owner == owner) & (App.name == name)
                                  & (App.version == version)).exists():
                raise AlreadyExists(f"{owner} already has {name} version {version}: "
                                    "give another --version (or remove that one)")
            for sha in shas:
                if Obj.get_or_none(Obj.sha256 == sha) is None:
                    raise NotFound(f"no data object {sha[:12]}… (upload it first)")
            App.insert(id=app_id, owner=owner, name=name, version=version, kind=kind,
                       spec=dumps(spec), access=access, share=dumps(names),
                       created_at=t).execute()
            for sha in shas:
                Ref.insert(sha256=sha, kind="app", ref_id=app_id, owner=owner,
                           created_at=t).execute()
            row = App.get(App.id == app_id)
        return _record(row)

    @op
    def app_versions(self, owner: str, name: str) -> list[AppRecord]:
        """Every version of ``owner``'s app ``name``, highest first."""
        App = self.models.App
        rows = [_record(r) for r in App.select().where((App.owner == owner)
                                                        & (App.name == name))]
        return sorted(rows, key=lambda a: (version_key(a.version), a.created_at),
                      reverse=True)

    def find_app(self, owner: str, name: str, version: str | None = None
                 ) -> AppRecord | None:
        """``owner``'s ``name`` at ``version`` (None or ``latest``: the highest)."""
        versions = self.app_versions(owner, name)
        if version in (None, LATEST):
            return versions[0] if versions else None
        return next((a for a in versions if a.version == version), None)

    def next_version(self, owner: str, name: str) -> str:
        """The version an add without one gets: 1, or one above the highest number."""
        numbers = [int(a.version.split(".")[0]) for a in self.app_versions(owner, name)
                   if a.version.split(".")[0].isdigit()]
        return str(max(numbers, default=0) + 1)

    @op
    def list_apps(self, owner: str | None, *, name: str | None = None, limit: int = 100,
                  offset: int = 0) -> tuple[list[AppRecord], int]:
        """A page of app versions (one owner's or everyone's) by owner, name, version."""
        App = self.models.App
        query = App.select()
        if owner is not None:
            query = query.where(App.owner == owner)
        if name is not None:
            query = query.where(App.name == name)
        rows = sorted((_record(r) for r in query),
                      key=lambda a: (a.owner, a.name, version_key(a.version)))
        return rows[offset:offset + limit], len(rows)

    @op
    def remove_apps(self, app_ids: Sequence[str]) -> int:
        """Delete these versions and their data references (the files go with the next
        garbage collection once nothing else keeps them); returns how many went."""
        App, Ref = self.models.App, self.models.DataRef
        ids = list(app_ids)
        if not ids:
            return 0
        with self.db.atomic():
            Ref.delete().where((Ref.kind == "app") & Ref.ref_id.in_(ids)).execute()
            return int(App.delete().where(App.id.in_(ids)).execute())
