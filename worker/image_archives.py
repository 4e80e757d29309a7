"""Docker images that travel through the grid: ``image_archive`` apps (docs/jobs.md).

An ``image_archive`` app is a ``docker save`` tar stored as a data object, for grids
where no registry is reachable. A job of such an app names the archive in its pinned
spec (``app`` {kind: image_archive, sha256, size}); before the attempt's container is
made, ``ImageArchives.image(sha256)`` fetches the archive through the input cache (as
job inputs are: by hash, verified, kept in the LRU cache) and ``docker load``s it,
streaming the file to the engine. Each archive is loaded once per worker: the image id
it gave is remembered in ``<state_dir>/image_archives.json`` (so a restart does not load
again), and loaded again only when the engine no longer has that image. Two attempts of
one archive wait for one load (a lock per archive). A file that is not a loadable
archive, or an engine that refuses it, raises ``ImageArchiveError`` (the attempt ends
``input_failed`` with its message).

Loaded images stay in the engine; removing them is the worker owner's business.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from worker.errors import WorkerError
from worker.input_cache import CacheError, InputCache, valid_sha256

log = logging.getLogger(__name__)

RECORD_FILE = "image_archives.json"
LOAD_TIMEOUT_S = 600  # the engine answers a large archive's load slowly
MAX_RECORDS = 4096  # archive -> image id lines kept (the oldest go first)

#: Makes the docker SDK client (``docker.DockerClient``) used for loads.
ClientFactory = Callable[[], Any]


class ImageArchiveError(WorkerError):
    """An image archive could not be had or loaded."""

    code = "input_failed"


def archive_of(spec: Mapping[str, Any]) -> str | None:
    """The SHA-256 of the archive an ``image_archive`` app job runs in (its pinned
    snapshot, coordinator/job_apps.py), or None for any other job."""
    app = spec.get("app")
    if not isinstance(app, Mapping) or app.get("kind") != "image_archive":
        return None
    sha = app.get("sha256")
    return sha if isinstance(sha, str) else None


def _default_client() -> Any:
    import docker

    return docker.from_env(timeout=LOAD_TIMEOUT_S)


class ImageArchives:
    """Archive SHA-256 -> the image id it loads as, loading each archive once."""

    def __init__(self, state_dir: Path | str, cache: InputCache,
                 client: ClientFactory = _default_client) -> None:
        self.path = Path(state_dir) / RECORD_FILE
        self.cache = cache
        self._make_client = client
        self._client: Any = None
        self._mutex = threading.Lock()  # guards the records, the locks, the counters
        self._writing = threading.Lock()  # one record write at a time, the newest last
        self._locks: dict[str, threading.Lock] = {}
        self._records: dict[str, str] = self._read()
        self.loads = 0  # archives loaded into the engine by this process
        self.waited = 0  # calls that found their archive being loaded and waited for it

    def image(self, sha256: str) -> str:
        """The engine's image id of archive ``sha256``, fetched and loaded if needed."""
        if not valid_sha256(sha256):
            raise ImageArchiveError(f"not a sha256: {sha256[:80]!r}")
        with self._mutex:
            lock = self._locks.setdefault(sha256, threading.Lock())
        if not lock.acquire(blocking=False):  # another attempt loads it: wait for that
            with self._mutex:
                self.waited += 1
            lock.acquire()
        try:
            with self._mutex:
                known = self._records.get(sha256)
            if known is not None and self._exists(known):
                return known
            try:
                with self.cache.use(sha256) as path:
                    image_id = self._load(sha256, path)
            except CacheError as err:
                raise ImageArchiveError(f"image archive {sha256[:12]}…: {err}") from err
            with self._mutex:
                self.loads += 1
                self._records.pop(sha256, None)
                self._records[sha256] = image_id
                while len(self._records) > MAX_RECORDS:
                    del self._records[next(iter(self._records))]
            self._write()
            return image_id
        finally:
            lock.release()

    # -- the engine --------------------------------------------------------------------

    def client(self) -> Any:
        with self._mutex:
            if self._client is None:
                try:
                    self._client = self._make_client()
                except Exception as err:
                    raise ImageArchiveError(f"no docker engine answers: {err}") from err
            return self._client

    def close(self) -> None:
        """Close the engine client (a later load makes another)."""
        with self._mutex:
            client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    def _exists(self, image_id: str) -> bool:
        import docker.errors

        try:
            self.client().images.get(image_id)
        except docker.errors.ImageNotFound:
            return False
        except docker.errors.DockerException as err:
            raise ImageArchiveError(f"cannot look up image {image_id[:19]}: {err}") from err
        return True

    def _load(self, sha256: str, path: Path) -> str:
        """``docker load`` the file at ``path`` (streamed, never read whole); the one
        image it holds."""
        import docker.errors

        what = f"image archive {sha256[:12]}…"
        log.info("loading %s (%d bytes) into docker", what, path.stat().st_size)
        try:
            with path.open("rb") as stream:
                images = self.client().images.load(stream)
        except (docker.errors.DockerException, OSError) as err:
            raise ImageArchiveError(f"{what} is not a docker save archive docker can load: "
                                    f"{err}") from err
        ids = sorted({str(i.id) for i in images})
        if len(ids) != 1:
            raise ImageArchiveError(f"{what} holds {len(ids)} images; an app's archive "
                                    "holds exactly one (docker save IMAGE)")
        log.info("%s loaded as image %s", what, ids[0][:19])
        return ids[0]

    # -- the record ----------------------------------------------------------------------

    def _read(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            log.warning("ignoring %s (%s): archives load again", self.path, err)
            return {}
        if not isinstance(data, dict):
            return {}
        return {str(k): str(v) for k, v in data.items()
                if valid_sha256(str(k)) and isinstance(v, str)}

    def _write(self) -> None:
        """Replace the record file (best effort: without it archives load again)."""
        tmp = self.path.with_name(f".{RECORD_FILE}.tmp")
        with self._writing:
            with self._mutex:
                records = dict(self._records)
            self._write_file(tmp, records)

    def _write_file(self, tmp: Path, records: dict[str, str]) -> None:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp.write_text(json.dumps(records))
            os.replace(tmp, self.path)
        except OSError as err:
            log.warning("cannot write %s: %s", self.path, err)
            with contextlib.suppress(OSError):
                tmp.unlink()
