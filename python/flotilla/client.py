"""The client of a flotilla coordinator's HTTP API (see docs/openapi.json).

Standard library only: mutual TLS through `ssl`, requests through
`urllib`, job events through server-sent events. PyYAML (for overrides of a
YAML job file) and pandas (for `Job.metrics()` as a DataFrame) are used when
installed.
"""

from __future__ import annotations

import copy
import http.client
import re
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

TERMINAL = ("succeeded", "failed", "cancelled")

JobSource = Union[str, "os.PathLike[str]", Mapping[str, Any]]
SWEEP_ENDED = ("done", "cancelled")


class FlotillaError(Exception):
    """An error of the API: its stable `code`, its `message` and the HTTP `status`."""

    def __init__(self, code: str, message: str, status: int = 0) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


def set_field(doc: Dict[str, Any], path: str, value: Any) -> None:
    """Sets `doc`'s field at the dotted `path` (`train.optimizer.lr`),
    making the sections on the way."""
    keys = path.split(".")
    if not all(keys):
        raise ValueError(f"override {path!r}: a field name is empty")
    node = doc
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        elif not isinstance(child, dict):
            raise ValueError(f"override {path!r}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def _url(addr: str) -> str:
    addr = addr.strip().rstrip("/")
    return addr if "://" in addr else f"https://{addr}"


class Client:
    """A coordinator (any replica: followers forward to the leader).

    `url` is one address or a comma-separated list (default
    `$FLOTILLA_COORDINATOR`); `token` an API token (default `$FLOTILLA_TOKEN`
    or the file `$FLOTILLA_TOKEN_FILE`); `tls_dir` a folder with `ca.pem`,
    `client.pem` and `client.key` (default `$FLOTILLA_TLS_DIR`), or the
    files one by one as `ca`, `cert` and `key`.
    """

    def __init__(
        self,
        url: Optional[str] = None,
        token: Optional[str] = None,
        tls_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
        *,
        ca: Optional[str] = None,
        cert: Optional[str] = None,
        key: Optional[str] = None,
        timeout: float = 30.0,
    ) -> None:
        url = url or os.environ.get("FLOTILLA_COORDINATOR") or "https://127.0.0.1:7070"
        self.urls = [_url(u) for u in url.split(",") if u.strip()]
        if token is None:
            token = os.environ.get("FLOTILLA_TOKEN")
        if token is None and os.environ.get("FLOTILLA_TOKEN_FILE"):
            token = Path(os.environ["FLOTILLA_TOKEN_FILE"]).read_text().strip()
        self.token = token
        self.timeout = timeout
        tls_dir = tls_dir or os.environ.get("FLOTILLA_TLS_DIR")
        if tls_dir:
            ca = ca or str(Path(tls_dir, "ca.pem"))
            cert = cert or str(Path(tls_dir, "client.pem"))
            key = key or str(Path(tls_dir, "client.key"))
        self._context: Optional[ssl.SSLContext] = None
        if any(u.startswith("https://") for u in self.urls):
            self._context = ssl.create_default_context(cafile=ca)
            if cert:
                self._context.load_cert_chain(cert, key)

    # ------------------------------------------------------------ transport

    def _open(self, method: str, path: str, body: Optional[bytes] = None, content_type: Optional[str] = None,
              timeout: Optional[float] = None) -> Any:
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if content_type:
            headers["Content-Type"] = content_type
        failures = []
        for base in self.urls:
            req = urllib.request.Request(base + path, data=body, headers=headers, method=method)
            try:
                return urllib.request.urlopen(req, context=self._context, timeout=timeout or self.timeout)
            except urllib.error.HTTPError as e:
                raise _api_error(e) from None
            except urllib.error.URLError as e:
                # Not connected (the replica is down): the next one.
                failures.append(f"{base}: {e.reason}")
        raise FlotillaError("unavailable", "no coordinator answered: " + "; ".join(failures))

    def _json(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        with self._open(method, path, data, "application/json" if data is not None else None) as resp:
            return json.loads(resp.read())

    # ------------------------------------------------------------ calls

    def submit(self, job: JobSource, overrides: Optional[Mapping[str, Any]] = None, *,
               base_dir: Optional[str] = None, submission_id: Optional[str] = None, **more: Any) -> "Job":
        """Submits a job file: a path, YAML text, or a dict of the same
        fields; `overrides` (and keyword arguments, `**{"train.steps": 10}`)
        set fields by dotted path first (`{"train.optimizer.lr": 1e-3}`).
        Relative paths in the job resolve
        against `base_dir` (default: the current directory, as with the CLI).
        A retry of the same call (same `submission_id`, one is made when not
        given) never makes a second job."""
        overrides = {**(overrides or {}), **more}
        origin = None
        if isinstance(job, Mapping):
            doc: Any = copy.deepcopy(dict(job))
        else:
            text = str(job)
            path = Path(job) if isinstance(job, os.PathLike) or "\n" not in text else None
            if path is not None and path.is_file():
                origin = str(path)
                text = path.read_text()
            elif isinstance(job, os.PathLike):
                raise FileNotFoundError(f"no job file {text}")
            doc = text
            if overrides:
                try:
                    import yaml  # type: ignore[import-untyped]
                except ImportError:
                    raise FlotillaError("invalid_argument", "overrides of a YAML job file need PyYAML "
                                        "(pip install pyyaml); or pass the job as a dict") from None
                doc = yaml.safe_load(text)
                if not isinstance(doc, dict):
                    raise FlotillaError("invalid_argument", "the job file is not a mapping of fields")
        for field, value in overrides.items():
            set_field(doc, field, value)
        body: Dict[str, Any] = {
            "job": doc,
            "base_dir": base_dir or os.getcwd(),
            "submission_id": submission_id or uuid.uuid4().hex,
        }
        if origin:
            # With overrides the coordinator reads the changed document (as
            # JSON), whose lines are not the file's.
            body["origin"] = f"{origin} with overrides" if overrides else origin
        answer = self._json("POST", "/api/v1/jobs", body)
        return Job(self, answer["job_id"])

    def sweep(self, sweep: JobSource, job: Optional[JobSource] = None, *, base_dir: Optional[str] = None,
              submission_id: Optional[str] = None) -> "Sweep":
        """Submits a sweep (docs/sweeps.md): a sweep file's path, or a dict
        of its fields. The base job is `job` when given (a path or a dict),
        else the sweep's `job` field: a path (relative to the sweep file's
        folder, or the current directory for a dict) or, in a dict, the job
        itself. The coordinator checks every trial's job file before it
        keeps the sweep; a retry with the same `submission_id` never makes
        a second sweep."""
        folder = Path.cwd()
        origin = "sweep"
        if isinstance(sweep, Mapping):
            sweep_doc: Any = copy.deepcopy(dict(sweep))
            named = sweep_doc.get("job")
        else:
            path = Path(sweep)
            origin, folder = str(path), path.resolve().parent
            sweep_doc = path.read_text()
            # The one field read here; the coordinator reads the rest.
            m = re.search(r"^job:[ \t]*['\"]?([^'\"#\n]+?)['\"]?[ \t]*(#.*)?$", sweep_doc, re.M)
            named = m.group(1) if m else None
        base = job if job is not None else named
        job_origin = "job"
        if isinstance(base, Mapping):
            job_doc: Any = copy.deepcopy(dict(base))
        elif base is not None:
            job_path = folder / Path(base)
            job_origin = str(job_path)
            job_doc = job_path.read_text()
        else:
            raise FlotillaError("invalid_argument", "the sweep names no base job: give its `job` field or `job=`")
        if isinstance(sweep_doc, dict) and not isinstance(sweep_doc.get("job"), str):
            sweep_doc["job"] = job_origin
        body: Dict[str, Any] = {
            "sweep": sweep_doc,
            "job": job_doc,
            "origin": origin,
            "job_origin": job_origin,
            "base_dir": base_dir or os.getcwd(),
            "submission_id": submission_id or uuid.uuid4().hex,
        }
        answer = self._json("POST", "/api/v1/sweeps", body)
        return Sweep(self, answer["sweep_id"])

    def sweeps(self) -> List["Sweep"]:
        """Every sweep, oldest first."""
        return [Sweep(self, s["sweep_id"], s) for s in self._json("GET", "/api/v1/sweeps")["sweeps"]]

    def job(self, job_id: str) -> "Job":
        """A job by id (its status is read on demand)."""
        return Job(self, job_id)

    def jobs(self) -> List["Job"]:
        """Every job, oldest first."""
        return [Job(self, s["job_id"], s) for s in self._json("GET", "/api/v1/jobs")["jobs"]]

    def workers(self) -> List[Dict[str, Any]]:
        return list(self._json("GET", "/api/v1/workers")["workers"])

    def leader(self) -> Optional[str]:
        """The address (one of this client's) of the replica that leads now,
        or None while none of those that answer says it leads (an election
        is under way)."""
        for base in self.urls:
            # Each replica answers this itself (no token needed).
            req = urllib.request.Request(base + "/api/v1/leader", headers={"Accept": "application/json"})
            try:
                with urllib.request.urlopen(req, context=self._context, timeout=self.timeout) as resp:
                    if json.loads(resp.read()).get("is_leader"):
                        return base
            except (OSError, http.client.HTTPException, ValueError):
                continue  # down, or not answering: ask the next one
        return None

    def events(self, job_id: str) -> Iterator[Tuple[str, Dict[str, Any]]]:
        """A job's events as (name, data) until it ends: `phase`,
        `progress`, `metric` and, last, `end` with its final status."""
        path = f"/api/v1/jobs/{urllib.parse.quote(job_id, safe='')}/events"
        with self._open("GET", path, timeout=3600.0) as resp:
            name, data = "", []
            for raw in resp:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("event:"):
                    name = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())
                elif not line and name:
                    value = json.loads("\n".join(data)) if data else {}
                    if name == "error":
                        raise FlotillaError(value.get("code", "internal"), value.get("message", ""))
                    yield name, value
                    name, data = "", []


class Job:
    """One job of a coordinator."""

    def __init__(self, client: Client, job_id: str, status: Optional[Dict[str, Any]] = None) -> None:
        self.client = client
        self.id = job_id
        self._status = status

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def _path(self, tail: str = "") -> str:
        return f"/api/v1/jobs/{urllib.parse.quote(self.id, safe='')}{tail}"

    def status(self) -> Dict[str, Any]:
        """The job's status now (phase, step, loss, checkpoints, ...)."""
        self._status = self.client._json("GET", self._path())
        return self._status

    def cancel(self) -> Dict[str, Any]:
        self._status = self.client._json("POST", self._path("/cancel"))
        return self._status

    def checkpoints(self) -> List[Dict[str, Any]]:
        return list(self.client._json("GET", self._path("/checkpoints"))["checkpoints"])

    def generations(self) -> List[Dict[str, Any]]:
        return list(self.client._json("GET", self._path("/generations"))["generations"])

    def registration(self) -> Optional[Dict[str, Any]]:
        """The registry outcome (None for a job without a registry)."""
        return self.client._json("GET", self._path("/registration"))["registration"]

    def model_files(self) -> List[Dict[str, Any]]:
        """The files of the job's trained model (`name`, `bytes`): the
        registered version's, or the job's `final/` folder's."""
        return list(self.client._json("GET", self._path("/model"))["files"])

    def download_model(self, dest: Union[str, "os.PathLike[str]"]) -> Path:
        """Downloads the job's trained model into the folder `dest` (made if
        missing); returns it."""
        folder = Path(dest)
        for f in self.model_files():
            target = folder / f["name"]
            target.parent.mkdir(parents=True, exist_ok=True)
            path = self._path("/model/" + urllib.parse.quote(f["name"], safe=""))
            with self.client._open("GET", path, timeout=3600.0) as resp, open(target, "wb") as out:
                while True:
                    chunk = resp.read(1 << 20)
                    if not chunk:
                        break
                    out.write(chunk)
            if target.stat().st_size != f["bytes"]:
                raise FlotillaError("unavailable", f"{f['name']}: got {target.stat().st_size} of {f['bytes']} bytes")
        return folder

    def metrics(self, as_frame: Optional[bool] = None) -> Any:
        """The metric points rank 0 reported: a list of records, or a pandas
        DataFrame when pandas is installed (`as_frame=False` for the list)."""
        points = list(self.client._json("GET", self._path("/metrics"))["points"])
        if as_frame is False:
            return points
        try:
            import pandas  # type: ignore[import-untyped]
        except ImportError:
            if as_frame:
                raise
            return points
        return pandas.DataFrame.from_records(points)

    def wait(self, progress: Optional[bool] = None) -> Dict[str, Any]:
        """Follows the job until it ends and returns its final status; with
        `progress` (default: when stderr is a terminal) draws a progress line."""
        if progress is None:
            progress = sys.stderr.isatty()
        while True:
            try:
                for name, data in self.client.events(self.id):
                    if progress and name == "progress":
                        total = data.get("total_steps") or 0
                        width = 30
                        done = int(width * data["step"] / total) if total else 0
                        sys.stderr.write(f"\r{self.id} [{'#' * done}{'.' * (width - done)}] {data['step']}/{total} "
                                         f"loss {data['loss']:.4f} {data['phase']}  ")
                        sys.stderr.flush()
                    if name == "end":
                        if progress:
                            sys.stderr.write("\n")
                        self._status = data
                        return data
            except FlotillaError as e:
                # The replica that streamed stopped leading: follow again.
                if e.code not in ("not_leader", "unavailable"):
                    raise
            except (OSError, http.client.HTTPException):
                pass  # the stream broke (a replica went away): follow again
            time.sleep(0.5)
            try:
                status = self.status()
            except FlotillaError as e:
                if e.code in ("not_leader", "unavailable"):
                    continue  # an election is under way
                raise
            if status["phase"] in TERMINAL:
                return status


class Sweep:
    """A sweep on the coordinator; its trials are jobs."""

    def __init__(self, client: Client, sweep_id: str, status: Optional[Dict[str, Any]] = None) -> None:
        self.client, self.id, self._status = client, sweep_id, status

    def __repr__(self) -> str:
        return f"Sweep({self.id!r})"

    def _path(self, tail: str = "") -> str:
        return f"/api/v1/sweeps/{urllib.parse.quote(self.id, safe='')}{tail}"

    def status(self) -> Dict[str, Any]:
        """The sweep now: its state (running, done, cancelled) and its
        trials, ranked."""
        self._status = self.client._json("GET", self._path())
        return self._status

    def leaderboard(self) -> List[Dict[str, Any]]:
        """The trials best first by the sweep's metric (those without a
        metric last, in trial order)."""
        return list(self.status()["trials"])

    def trials(self) -> List[Job]:
        """The trials' jobs that have started, in trial order."""
        started = sorted((t for t in self.status()["trials"] if t.get("job_id")), key=lambda t: t["trial"])
        return [Job(self.client, t["job_id"]) for t in started]

    def cancel(self) -> Dict[str, Any]:
        """Cancels the sweep and every trial of it that has not ended."""
        self._status = self.client._json("POST", self._path("/cancel"))
        return self._status

    def wait(self, poll: float = 0.5, progress: Optional[bool] = None) -> Dict[str, Any]:
        """Waits until the sweep is done or cancelled; returns its status.
        Rides out a change of leader."""
        if progress is None:
            progress = sys.stderr.isatty()
        while True:
            try:
                status = self.status()
            except FlotillaError as e:
                if e.code not in ("not_leader", "unavailable"):
                    raise
            except (OSError, http.client.HTTPException):
                pass
            else:
                if progress:
                    ended = sum(t["state"] in TERMINAL + ("stopped",) for t in status["trials"])
                    sys.stderr.write(f"\r{self.id}: {ended}/{len(status['trials'])} trials ended  ")
                    sys.stderr.flush()
                if status["state"] in SWEEP_ENDED:
                    if progress:
                        sys.stderr.write("\n")
                    return status
            time.sleep(poll)


def _api_error(e: urllib.error.HTTPError) -> FlotillaError:
    try:
        body = json.loads(e.read())
        return FlotillaError(str(body["code"]), str(body["message"]), e.code)
    except (ValueError, KeyError, TypeError):
        return FlotillaError("http_error", f"HTTP {e.code} {e.reason}", e.code)
