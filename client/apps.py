"""Applications in Python: ``grid.apps`` (docs/data.md, "Applications").

    with Grid.connect() as grid:
        app = grid.apps.add("sim", version="2.1",
                            binaries={"linux/amd64": "./sim", "linux/arm64": "./sim-arm"})
        grid.apps.add("render", image="blender:4.1")            # an image the workers hold
        grid.apps.add("tool", image_archive="tool.tar")          # `docker save` output
        grid.apps.add("count", command="wc -l")
        for app in grid.apps.ls():
            print(app.name, app.version, app.kind)
        grid.apps.show("sim")            # the latest version; version="2.1" for another
        grid.apps.rm("sim", version="2.1")

Binaries and image archives are uploaded through ``grid.data`` first (content the
coordinator holds already is not sent again) under the data name
``app:NAME:VERSION:PLATFORM`` (``...:image`` for an archive), then the coordinator
registers the app and keeps those objects while it exists. Every error is a
``ClientError``; refusals are ``Refused`` with the coordinator's words and code.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.data import ACCESS, Progress, is_sha256
from client.errors import InvalidRequest
from schemas.app_messages import (
    AppsAdd,
    AppsList,
    AppsListReply,
    AppsRm,
    AppsShow,
    AppsShowReply,
)

if TYPE_CHECKING:
    from client.api import Grid

log = logging.getLogger(__name__)

PAGE = 500
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
PLATFORM_RE = re.compile(r"^[A-Za-z0-9_]+/[A-Za-z0-9_]+(/[A-Za-z0-9]+)?$")


@dataclass(frozen=True)
class AppInfo:
    """One application version as the coordinator holds it."""

    id: str
    owner: str
    name: str
    version: str
    kind: str
    binaries: dict[str, dict[str, Any]] = field(default_factory=dict)  # platform -> sha, size
    image: str | None = None
    sha256: str | None = None
    size: int | None = None
    command: str | None = None
    access: str = "private"
    share: tuple[str, ...] = ()
    created_at: float | None = None
    latest: bool | None = None
    versions: tuple[str, ...] = ()  # apps.show: every version, highest first

    @classmethod
    def from_wire(cls, item: Mapping[str, Any], versions: Sequence[str] = ()) -> AppInfo:
        return cls(id=str(item["id"]), owner=str(item["owner"]), name=str(item["name"]),
                   version=str(item["version"]), kind=str(item["kind"]),
                   binaries={str(k): dict(v) for k, v in (item.get("binaries") or {}).items()},
                   image=item.get("image"), sha256=item.get("sha256"), size=item.get("size"),
                   command=item.get("command"), access=str(item.get("access") or "private"),
                   share=tuple(item.get("share") or ()), created_at=item.get("created_at"),
                   latest=item.get("latest"), versions=tuple(versions))

    def to_dict(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data["share"] = list(self.share)
        data["versions"] = list(self.versions)
        return {k: v for k, v in data.items() if v not in (None, [], {})}

    def describe(self) -> str:
        """What it runs, in a few words (the listing's WHAT column)."""
        if self.kind == "binaries":
            return ", ".join(sorted(self.binaries))
        if self.kind == "image":
            return f"image {self.image}"
        if self.kind == "image_archive":
            return f"archive {(self.sha256 or '')[:12]}"
        command = self.command or ""
        return command if len(command) <= 40 else command[:39] + "…"


def _check_name(name: str) -> None:
    if not NAME_RE.match(name or ""):
        raise InvalidRequest(f"an app name is 1-128 letters, digits, '.', '_' or '-', "
                             f"starting with a letter or digit, not {name!r:.80}")


def _check_version(version: str | None) -> None:
    if version is not None and (not VERSION_RE.match(version) or version == "latest"):
        raise InvalidRequest(f"a version is 1-64 letters, digits, '.', '_', '+' or '-' (and "
                             f"not 'latest'), not {version!r:.80}")


class AppStore:
    """``grid.apps``: the coordinator's applications (see the module docstring)."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def add(self, name: str, *, version: str | None = None,
            binaries: Mapping[str, str | os.PathLike[str]] | None = None,
            image: str | None = None, image_archive: str | os.PathLike[str] | None = None,
            command: str | None = None, access: str | None = None,
            share: Sequence[str] | None = None, progress: Progress | None = None) -> AppInfo:
        """Register a version of app ``name`` with exactly one of: ``binaries``
        (platform such as ``linux/amd64`` -> a local file, or the SHA-256 of a data
        object you may read), ``image`` (a Docker image the workers hold),
        ``image_archive`` (a ``docker save`` tar file, or its data object's SHA-256) or
        ``command``. ``version`` defaults to 1, or one above the highest number.
        Returns the registered version."""
        _check_name(name)
        _check_version(version)
        given = [k for k, v in (("binaries", binaries), ("image", image),
                                ("image_archive", image_archive), ("command", command))
                 if v]
        if len(given) != 1:
            raise InvalidRequest("give exactly one of binaries, image, image_archive and "
                                 f"command (got {', '.join(given) or 'none'})")
        shared = [s for s in share or () if s]
        access = access or ("shared" if shared else "private")
        if access not in ACCESS:
            raise InvalidRequest(f"access must be one of {', '.join(ACCESS)}, not {access!r}")
        if shared and access != "shared":
            raise InvalidRequest(f"access {access} takes no share list")
        if len(shared) > 64:
            raise InvalidRequest("share an app with at most 64 principals")
        if image is not None and not 1 <= len(image) <= 256:
            raise InvalidRequest("an image name is 1-256 characters")
        if command is not None and not 1 <= len(command) <= 4096:
            raise InvalidRequest("a command is 1-4096 characters")
        label = f"app:{name}:{version or 'next'}"
        body: dict[str, Any] = {}
        if binaries:
            if len(binaries) > 16:
                raise InvalidRequest("an app has at most 16 platforms")
            for platform in binaries:
                if not PLATFORM_RE.match(platform) or len(platform) > 64:
                    raise InvalidRequest(f"a platform is OS/ARCH such as linux/amd64, "
                                         f"not {platform!r:.80}")
            body["binaries"] = {
                platform: self._upload(path, f"{label}:{platform}", progress)
                for platform, path in sorted(binaries.items())}
        elif image_archive:
            body["sha256"] = self._upload(image_archive, f"{label}:image", progress)
        request = AppsAdd(name=name, kind=given[0], version=version,
                          binaries=body.get("binaries"), image=image,
                          sha256=body.get("sha256"), command=command,
                          access=access, share=shared or None)
        reply = self.grid.ask(request, what=f"register app {name}")
        detail = reply.detail or {}
        return self.show(name, version=str(detail.get("version") or version or "latest"))

    def _upload(self, path: str | os.PathLike[str], label: str,
                progress: Progress | None) -> str:
        """The SHA-256 of ``path`` once stored (a hash is taken as it is)."""
        text = os.fspath(path)
        if is_sha256(text) and not Path(text).exists():
            return text
        if not Path(text).is_file():
            raise InvalidRequest(f"{text} is not a file")
        return self.grid.data.put(text, name=label, progress=progress).sha256

    def ls(self, *, name: str | None = None, owner: str | None = None, all: bool = False,
           limit: int | None = None) -> list[AppInfo]:
        """Your app versions (another ``owner``'s that you may read; admins: everyone's
        with ``all``), by owner, name and version."""
        if name is not None:
            _check_name(name)
        out: list[AppInfo] = []
        offset = 0
        while True:
            page = PAGE if limit is None else min(PAGE, limit - len(out))
            if page <= 0:
                break
            reply: AppsListReply = self.grid.ask(
                AppsList(all=all or None, owner=owner, name=name, limit=page,
                         offset=offset or None), what="list apps")
            out.extend(AppInfo.from_wire(item) for item in reply.items)
            offset += len(reply.items)
            if not reply.more or not reply.items:
                break
        return out

    def show(self, name: str, *, version: str | None = None,
             owner: str | None = None) -> AppInfo:
        """One version (default the latest) with the list of all versions."""
        _check_name(name)
        if version != "latest":
            _check_version(version)
        reply: AppsShowReply = self.grid.ask(
            AppsShow(name=name, version=version, owner=owner), what=f"show app {name}")
        return AppInfo.from_wire(reply.item, reply.versions or ())

    def rm(self, name: str, *, version: str | None = None, all: bool = False,
           owner: str | None = None) -> int:
        """Remove one version (or ``all``); returns how many went. Its files are
        collected once nothing else keeps them."""
        _check_name(name)
        if version != "latest":
            _check_version(version)
        if (version is None) == (not all):
            raise InvalidRequest("give the version to remove, or all=True for every version")
        reply = self.grid.ask(AppsRm(name=name, version=version, all=all or None,
                                     owner=owner), what=f"remove app {name}")
        return int((reply.detail or {}).get("removed", 0))
