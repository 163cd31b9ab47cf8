"""Where outputs live: local folders and ``pyarrow.fs`` URIs (``s3://``, ``gs://``, ``file://``, ...).

The convention of Ray Train's ``storage_path``: a plain path is a local folder; anything of the form
``scheme://...`` is opened with :func:`pyarrow.fs.FileSystem.from_uri` (credentials and endpoint from the usual
environment: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_REGION``; Google's
application-default credentials). A ``file://`` URI is a local folder like a plain path.

A run whose output is remote is written exactly as a local run into a node-local staging folder (the client
store's spill files stay there) and :class:`RunMirror` copies it to the URI after every round, checkpoint and at
the end. Object stores have no atomic rename, so the commit protocol is one whole PUT per object, in an order a
reader can trust:

1. config.yaml, the Parquet tables and adapter/ (each object replaced whole);
2. a checkpoint's files (``checkpoints/round-NNNNNN/...``), then the ``checkpoints/LATEST`` object naming it (the
   commit marker), then the older checkpoint folders the local run pruned are deleted;
3. summary.json, last of all (it marks the run complete).

``client_store/`` (spill files) and temporary files are never uploaded. A reader (``fedsim resume``, ``report``, a
sweep's complete check) trusts only the checkpoint LATEST names and only a run with summary.json as complete.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs

from fedsim.errors import UserError

SUMMARY, CONFIG = "summary.json", "config.yaml"
CHECKPOINTS, LATEST = "checkpoints", "LATEST"  # as fedsim.server.checkpoint (not imported: torch-free module)
SPILL_DIR = "client_store"  # as fedsim.server.client_store.SPILL_DIR: node-local, never uploaded
CHECK_TIMEOUT_S = 30.0  # how long the bucket check before a run waits for the storage to answer
T = TypeVar("T")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_FORMS = "a local path or a file://, s3:// or gs:// URI"
_REACH = "check the endpoint (AWS_ENDPOINT_URL for S3-compatible servers, AWS_REGION), the network and the credentials"
_REACH_GCS = "check the network and the credentials (GOOGLE_APPLICATION_CREDENTIALS or the node's service account)"


def _reach_hint(text: str) -> str:
    return _REACH_GCS if text.startswith(("gs://", "gcs://")) else _REACH


def is_uri(text: str) -> bool:
    """Whether ``text`` is a ``scheme://...`` URI (else a local path)."""
    return bool(_URI.match(str(text)))


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).strip().splitlines()[:1]) or type(err).__name__
    return text[:300]


@dataclass(frozen=True)
class Location:
    """A parsed output/input location: a local folder (``local`` set) or a folder of a remote filesystem (``fs``
    and ``path``: ``bucket/prefix`` without a trailing slash). ``text`` is what the user gave (for messages)."""

    text: str
    local: Path | None = None
    fs: pafs.FileSystem | None = None
    path: str = ""

    @property
    def remote(self) -> bool:
        return self.local is None

    @property
    def name(self) -> str:
        """The last path component (a run's label, a cell's id)."""
        return self.local.name if self.local is not None else self.path.rstrip("/").rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return self.text

    def child(self, *parts: str) -> Location:
        """The location of ``parts`` below this one."""
        if self.local is not None:
            return Location(str(self.local.joinpath(*parts)), local=self.local.joinpath(*parts))
        rel = "/".join(parts)
        return Location(f"{self.text.rstrip('/')}/{rel}", fs=self.fs, path=f"{self.path}/{rel}")

    # --- remote operations (one object = one whole PUT) ------------------------------------------------------------

    def key(self, rel: str = "") -> str:
        """The filesystem path of ``rel`` (a POSIX relative path) below this remote location."""
        return f"{self.path}/{rel}" if rel else self.path

    def _fs(self) -> pafs.FileSystem:
        if self.fs is None:
            raise ValueError(f"{self.text}: a local folder has no remote operations")
        return self.fs

    def is_file(self, rel: str) -> bool:
        return self._fs().get_file_info(self.key(rel)).type == pafs.FileType.File

    def entries(self, rel: str = "") -> dict[str, bool]:
        """The names directly below ``rel`` -> whether each is a folder ({} when nothing is there)."""
        infos = self._fs().get_file_info(pafs.FileSelector(self.key(rel), recursive=False, allow_not_found=True))
        return {i.base_name: i.type == pafs.FileType.Directory for i in infos}

    def files(self, rel: str = "") -> list[str]:
        """Every file below ``rel``, as paths relative to this location (sorted)."""
        selector = pafs.FileSelector(self.key(rel), recursive=True, allow_not_found=True)
        infos = self._fs().get_file_info(selector)
        cut = len(self.path) + 1
        return sorted(i.path[cut:] for i in infos if i.type == pafs.FileType.File)

    def read_bytes(self, rel: str) -> bytes:
        with self._fs().open_input_stream(self.key(rel)) as f:
            return f.read()

    def upload(self, src: Path, rel: str) -> None:
        """Copy the local file ``src`` to ``rel`` as one whole object (read first: a failed read uploads nothing)."""
        data = Path(src).read_bytes()
        with self._fs().open_output_stream(self.key(rel)) as out:
            out.write(data)

    def download(self, rel: str, dest: Path) -> None:
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(self.read_bytes(rel))

    def delete(self, rel: str = "") -> None:
        """Delete the folder ``rel`` (its contents when ``rel`` is empty) or the file ``rel``; nothing if absent."""
        fs, key = self._fs(), self.key(rel)
        kind = fs.get_file_info(key).type
        if kind == pafs.FileType.File:
            fs.delete_file(key)
        elif not rel:
            fs.delete_dir_contents(key, missing_dir_ok=True)
        elif kind == pafs.FileType.Directory:
            fs.delete_dir_contents(key, missing_dir_ok=True)
            try:
                fs.delete_dir(key)
            except FileNotFoundError:  # no folder marker object: nothing left to delete
                pass


def local_location(path: Path | str) -> Location:
    return Location(str(path), local=Path(path))


def parse_location(text: str | Path, flag: str, *, check: bool = True) -> Location:
    """Parse ``text`` (named ``flag`` in messages, e.g. ``--out``) once: a plain path or ``file://`` URI -> a local
    Location; another URI -> its pyarrow filesystem and path. With ``check``, a remote location's bucket is asked
    for (:func:`check_access`).

    Raises UserError naming ``flag`` for a scheme pyarrow cannot open, a URI without a bucket, and (``check``) a
    missing bucket or unreachable storage."""
    text = str(text)
    if not is_uri(text):
        return local_location(text)
    try:
        fs, path = pafs.FileSystem.from_uri(text)
    except (pa.ArrowInvalid, ValueError) as err:  # an unknown scheme or a malformed URI
        scheme = text.split("://", 1)[0]
        raise UserError(
            f"{flag} {text}: pyarrow cannot open {scheme}:// URIs here ({_first_line(err)}); give {_FORMS}"
        ) from None
    except (pa.ArrowException, OSError) as err:  # e.g. resolving an S3 bucket's region needs the network
        raise UserError(f"{flag} {text}: cannot open this location ({_first_line(err)}); {_reach_hint(text)}") from None
    if isinstance(fs, pafs.LocalFileSystem):
        return Location(text, local=Path(path))
    path = path.strip("/")
    if not path:
        raise UserError(f"{flag} {text}: no bucket in the URI; write e.g. {text.rstrip('/')}/my-bucket/runs/exp1")
    loc = Location(text, fs=fs, path=path)
    if check:
        check_access(loc, flag)
    return loc


def _within(seconds: float, ask: Callable[[], T]) -> T:
    """``ask()`` in a daemon thread; raise TimeoutError if it has not returned after ``seconds`` (pyarrow's own
    retries can take many minutes, e.g. GCS without a network)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = ask()
        except BaseException as err:  # handed to the caller
            box["error"] = err

    thread = threading.Thread(target=run, daemon=True, name="fedsim-storage-check")
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"no answer in {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def check_access(loc: Location, flag: str, timeout: float = CHECK_TIMEOUT_S) -> None:
    """Raise UserError (naming ``flag``) when the bucket of the remote ``loc`` does not exist or the storage cannot
    be reached or read within ``timeout`` seconds (endpoint, network, credentials). Local locations are not
    checked here."""
    if loc.local is not None:
        return
    bucket = loc.path.split("/", 1)[0]
    fs = loc._fs()
    try:
        info = _within(timeout, lambda: fs.get_file_info(bucket))
    except OSError as err:
        raise UserError(
            f"{flag} {loc}: cannot reach the storage ({_first_line(err)}); {_reach_hint(loc.text)}"
        ) from None
    if info.type == pafs.FileType.NotFound:
        scheme = loc.text.split("://", 1)[0]
        how = (
            f"`gcloud storage buckets create gs://{bucket}`"
            if scheme in ("gs", "gcs")
            else f"`aws s3 mb s3://{bucket}` (add --endpoint-url for an S3-compatible server)"
        )
        raise UserError(f"{flag} {loc}: bucket {bucket!r} does not exist; create it first, e.g. {how}")


def pull(loc: Location, dest: Path, keep: Callable[[str], bool] = lambda rel: True) -> list[str]:
    """Download the files below the remote ``loc`` whose relative path passes ``keep`` into ``dest``; return them."""
    got = [rel for rel in loc.files() if keep(rel)]
    for rel in got:
        loc.download(rel, Path(dest) / rel)
    return got


def push(folder: Path, loc: Location) -> list[str]:
    """Upload every file below the local ``folder`` to the remote ``loc`` (one object each); return them."""
    folder = Path(folder)
    sent = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    for rel in sent:
        loc.upload(folder / rel, rel)
    return sent


@contextmanager
def local_folder(loc: Location, prefix: str = "fedsim-") -> Iterator[Path]:
    """The local folder standing for ``loc``: its own folder when local, else a temporary one (removed after)."""
    if loc.local is not None:
        yield loc.local
        return
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class RunMirror:
    """Mirrors a run written into the local staging ``folder`` to the remote ``location`` (see the module doc for
    the order). :meth:`sync` uploads what changed since the last call (by size and modification time)."""

    def __init__(self, folder: Path, location: Location) -> None:
        if location.local is not None:
            raise ValueError("RunMirror needs a remote location")
        self.folder, self.location = Path(folder), location
        self._sent: dict[str, tuple[int, int]] = {}

    @property
    def uri(self) -> str:
        return str(self.location)

    @classmethod
    @contextmanager
    def staged(cls, location: Location, *, resume: bool = False) -> Iterator[RunMirror]:
        """A mirror of ``location`` with a fresh node-local staging folder (removed on exit). ``resume``: the
        staging folder first gets what a resume reads (:meth:`pull_for_resume`)."""
        with local_folder(location, prefix="fedsim-stage-") as folder:
            mirror = cls(folder, location)
            if resume:
                mirror.pull_for_resume()
            yield mirror

    def _stat(self, rel: str) -> tuple[int, int]:
        st = (self.folder / rel).stat()
        return st.st_size, st.st_mtime_ns

    def _local_files(self) -> list[str]:
        out = []
        for p in self.folder.rglob("*"):
            rel = p.relative_to(self.folder)
            if rel.parts[0] == SPILL_DIR or any(part.startswith(".") for part in rel.parts) or p.name.endswith(".tmp"):
                continue
            if p.is_file():
                out.append(rel.as_posix())
        return sorted(out)

    def _send(self, rel: str) -> bool:
        stat = self._stat(rel)
        if self._sent.get(rel) == stat:
            return False
        self.location.upload(self.folder / rel, rel)
        self._sent[rel] = stat
        return True

    def pull_for_resume(self) -> str | None:
        """Download config.yaml, the tables (top-level files) and the checkpoint ``checkpoints/LATEST`` names (only
        that one: a folder not named there may be half-uploaded); return its name (None: no committed checkpoint)."""
        loc = self.location
        for name, is_dir in loc.entries().items():
            if not is_dir and name != SUMMARY:
                loc.download(name, self.folder / name)
        latest = f"{CHECKPOINTS}/{LATEST}"
        name = loc.read_bytes(latest).decode().strip() if loc.is_file(latest) else ""
        if name:
            files = loc.files(f"{CHECKPOINTS}/{name}")
            for rel in files:
                loc.download(rel, self.folder / rel)
            if files:
                loc.download(latest, self.folder / latest)
        for rel in self._local_files():  # already there: not uploaded again
            self._sent[rel] = self._stat(rel)
        return name or None

    def sync(self) -> None:
        """Upload what changed: data files and adapter/, then checkpoint files, then LATEST (and delete the remote
        checkpoint folders the local run pruned), then summary.json."""
        files = self._local_files()
        latest = f"{CHECKPOINTS}/{LATEST}"
        in_ckpt = [r for r in files if r.startswith(f"{CHECKPOINTS}/") and r != latest]
        for rel in [r for r in files if r not in in_ckpt and r not in (latest, SUMMARY)] + in_ckpt:
            self._send(rel)
        if latest in files and self._send(latest):
            kept = {p.name for p in (self.folder / CHECKPOINTS).iterdir() if p.is_dir()}
            for name, is_dir in self.location.entries(CHECKPOINTS).items():
                if is_dir and name.startswith("round-") and name not in kept:
                    self.location.delete(f"{CHECKPOINTS}/{name}")
        if SUMMARY in files:
            self._send(SUMMARY)
