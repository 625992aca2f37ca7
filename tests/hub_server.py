"""A small in-memory server that speaks the part of the Hugging Face Hub HTTP API that uploads and downloads use.

Checked against the clients installed with this project: huggingface_hub 2.4.0 (`hf_api.py`, `_commit_api.py`,
`file_download.py`, `_snapshot_download.py`, `utils/_http.py`) and transformers 5.24. Point a client at it with
`HF_ENDPOINT=http://127.0.0.1:PORT` (read by `huggingface_hub.constants` at import time).

Storage is real enough for revisions to matter: every commit is an id plus a `{path: bytes}` snapshot, and each repo
maps branch names to commit ids, so a commit id or a branch name resolves to exactly the files it had.

Implemented, for model repos and alike for Space repos (`KIND` below is `models` or `spaces`; a Space's routes
outside `/api` start with `spaces/`, and it is created with an `sdk`, which its info reports):

- `POST /api/repos/create` (409 with a `url` in the body when the repo exists), `POST /api/validate-yaml`,
  `GET /api/whoami-v2`;
- `POST /api/KIND/{repo}/preupload/{rev}` (every file is "regular": no LFS, no Xet; the remote blob `oid` lets the
  client skip unchanged files), `POST /api/KIND/{repo}/commit/{rev}` (NDJSON: `header`, `file` in base64,
  `deletedFile`), `POST /api/KIND/{repo}/branch/{name}`;
- `GET /api/KIND/{repo}[/revision/{rev}]`, `GET /api/KIND/{repo}/tree/{rev}[/{path}]` (one page, no `Link`);
- `HEAD`/`GET [spaces/]{repo}/resolve/{rev}/{path}` with `X-Repo-Commit`, `ETag` (the git blob id) and
  `Content-Length`.

Errors carry the `X-Error-Code` header (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`) the client turns into
its typed exceptions. Only `token` is accepted: a wrong bearer token is answered 401 everywhere, writes without a token
are 401, and a private repo is invisible (404 `RepoNotFound`) without it.

Not implemented: LFS and Xet transfers (`lfsFile` commit lines are refused), pull requests (`create_pr`), datasets,
Space runtimes (hardware, secrets, builds), `deletedFolder`, copies, pagination, `parentCommit` checks, range
requests, `list_repo_refs`/commits, deleting repos or branches, gated repos, rate limits. Unknown routes answer 404
without an error code.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

USER = "test-user"
# Repo kinds by the segment that names them in `/api/{kind}/...`, and the prefix of their URLs outside `/api`.
URL_PREFIXES = {"models": "", "spaces": "spaces/"}
REPO_TYPES = {"model": "models", "space": "spaces"}


def git_blob_id(content: bytes) -> str:
    """The id git (and the Hub, for regular files) gives a blob: sha1 over a `blob <size>\\0` header and the bytes."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, body: dict | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.code, self.body = status, message, code, body
        self.headers = headers or {}


class Repo:
    def __init__(self, repo_id: str, private: bool, first_commit: str, sdk: str | None = None):
        self.repo_id, self.private, self.sdk = repo_id, private, sdk
        self.commits: dict[str, dict[str, bytes]] = {first_commit: {}}
        self.branches: dict[str, str] = {"main": first_commit}

    def resolve(self, revision: str) -> str:
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.commits:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


class HubServer(ThreadingHTTPServer):
    """`HubServer(token).start()` serves on 127.0.0.1 at a free port; `url` is the endpoint, `stop()` shuts it down."""

    daemon_threads = True

    def __init__(self, token: str):
        super().__init__(("127.0.0.1", 0), HubRequestHandler)
        self.token = token
        self.repos: dict[str, Repo] = {}  # model repos
        self.spaces: dict[str, Repo] = {}
        self.requests: list[str] = []  # "METHOD path" of every request, to check what a client asked for
        self.lock = threading.Lock()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def repos_of(self, kind: str) -> dict[str, Repo]:
        return self.spaces if kind == "spaces" else self.repos

    def new_commit_id(self) -> str:
        return hashlib.sha1(f"commit-{next(self._ids)}-{id(self)}".encode()).hexdigest()

    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


class HubRequestHandler(BaseHTTPRequestHandler):
    server: HubServer

    def log_message(self, format, *args):
        """Quiet: `server.requests` keeps the log."""

    # ---------------------------------------------------------------------------------------------------- plumbing
    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        self.query = parse_qs(split.query)
        # Split before unquoting: a revision such as "refs%2Fpr%2F1" is one segment.
        parts = [unquote(part) for part in split.path.strip("/").split("/")]
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else b""
        with self.server.lock:
            self.server.requests.append(f"{method} {split.path}")
            try:
                self._check_token()
                status, headers, payload = self._route(method, parts)
            except HubError as error:
                headers = {**error.headers, "X-Error-Message": error.message}
                if error.code:
                    headers["X-Error-Code"] = error.code
                status, payload = error.status, {"error": error.message, **(error.body or {})}
        self._send(method, status, headers, payload)

    def _send(self, method: str, status: int, headers: dict, payload) -> None:
        if isinstance(payload, bytes):
            data = payload
            headers.setdefault("Content-Type", "application/octet-stream")
        else:
            data = json.dumps(payload).encode()
            headers.setdefault("Content-Type", "application/json")
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)

    def _check_token(self) -> None:
        authorization = self.headers.get("Authorization")
        self.authenticated = authorization == f"Bearer {self.server.token}"
        if authorization is not None and not self.authenticated:
            raise HubError(401, "Invalid credentials in Authorization header")

    def _require_token(self) -> None:
        if not self.authenticated:
            raise HubError(401, "You must be authenticated to access this resource")

    def _repo(self, kind: str, repo_id: str) -> Repo:
        repo = self.server.repos_of(kind).get(repo_id)
        if repo is None or (repo.private and not self.authenticated):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _json(self) -> dict:
        return json.loads(self.body or b"{}")

    # ------------------------------------------------------------------------------------------------------ routes
    def _route(self, method: str, parts: list[str]):
        if parts[:1] == ["api"]:
            if method == "GET" and parts[1:] == ["whoami-v2"]:
                self._require_token()
                return 200, {}, {"type": "user", "name": USER, "auth": {"accessToken": {"role": "write"}}}
            if method == "POST" and parts[1:] == ["validate-yaml"]:
                return 200, {}, {"errors": [], "warnings": []}
            if method == "POST" and parts[1:] == ["repos", "create"]:
                return self._create_repo()
            if len(parts) >= 4 and parts[1] in URL_PREFIXES:
                return self._repo_api(method, parts[1], f"{parts[2]}/{parts[3]}", parts[4:])
        kind = "spaces" if parts[:1] == ["spaces"] else "models"
        repo_parts = parts[1:] if kind == "spaces" else parts
        if method in ("GET", "HEAD") and len(repo_parts) >= 5 and repo_parts[2] == "resolve":
            return self._resolve(kind, f"{repo_parts[0]}/{repo_parts[1]}", repo_parts[3], "/".join(repo_parts[4:]))
        raise HubError(404, f"Not implemented by tests/hub_server.py: {method} {self.path}")

    def _create_repo(self):
        self._require_token()
        payload = self._json()
        repo_type = payload.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise HubError(400, "tests/hub_server.py only hosts model and Space repos")
        kind = REPO_TYPES[repo_type]
        sdk = payload.get("sdk")
        if kind == "spaces" and not sdk:
            raise HubError(400, "A Space needs an sdk")
        repos = self.server.repos_of(kind)
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        url = f"{self.server.url}/{URL_PREFIXES[kind]}{repo_id}"
        if repo_id in repos:
            raise HubError(409, f"You already created this {repo_type} repo", body={"url": url})
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repos[repo_id] = Repo(repo_id, private, self.server.new_commit_id(), sdk=sdk)
        return 200, {}, {"url": url, "name": repo_id}

    def _repo_api(self, method: str, kind: str, repo_id: str, rest: list[str]):
        repo = self._repo(kind, repo_id)
        if method == "GET" and not rest:
            return 200, {}, self._repo_info(repo, "main")
        if method == "GET" and len(rest) == 2 and rest[0] == "revision":
            return 200, {}, self._repo_info(repo, rest[1])
        if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
            return 200, {}, self._tree(repo, rest[1], "/".join(rest[2:]))
        if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
            files = repo.commits[repo.resolve(rest[1])]
            answer = [
                {
                    "path": file["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_id(files[file["path"]]) if file["path"] in files else None,
                }
                for file in self._json()["files"]
            ]
            return 200, {}, {"files": answer}
        if method == "POST" and len(rest) == 2 and rest[0] == "commit":
            return self._commit(kind, repo, rest[1])
        if method == "POST" and len(rest) == 2 and rest[0] == "branch":
            self._require_token()
            if rest[1] in repo.branches:
                raise HubError(409, f"Reference already exists: {rest[1]}")
            starting_point = self._json().get("startingPoint") or "main"
            repo.branches[rest[1]] = repo.resolve(starting_point)
            return 200, {}, {}
        raise HubError(404, f"Not implemented by tests/hub_server.py: {method} {self.path}")

    def _repo_info(self, repo: Repo, revision: str) -> dict:
        sha = repo.resolve(revision)
        info = {
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "sha": sha,
            "private": repo.private,
            "siblings": [{"rfilename": path} for path in sorted(repo.commits[sha])],
        }
        return info if repo.sdk is None else {**info, "sdk": repo.sdk}

    def _tree(self, repo: Repo, revision: str, folder: str) -> list[dict]:
        files = repo.commits[repo.resolve(revision)]
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = f"{folder}/" if folder else ""
        if folder and folder in files:
            raise HubError(404, f"{folder} is a file, not a folder", "EntryNotFound")
        entries: dict[str, dict] = {}
        for path, content in sorted(files.items()):
            if not path.startswith(prefix):
                continue
            relative = path[len(prefix) :].split("/")
            for depth in range(1, len(relative)):  # the folders on the way
                if recursive or depth == 1:
                    name = prefix + "/".join(relative[:depth])
                    entries.setdefault(name, {"type": "directory", "path": name, "oid": git_blob_id(name.encode())})
            if recursive or len(relative) == 1:
                entries[path] = {"type": "file", "path": path, "size": len(content), "oid": git_blob_id(content)}
        if folder and not entries:
            raise HubError(404, f"{folder} does not exist on {revision}", "EntryNotFound")
        return list(entries.values())

    def _commit(self, kind: str, repo: Repo, revision: str):
        self._require_token()
        if revision not in repo.branches:  # commits go onto a branch
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        files = dict(repo.commits[repo.branches[revision]])
        summary = ""
        for line in self.body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value.get("summary", "")
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, "only base64 file contents are supported")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                del files[value["path"]]
            else:
                raise HubError(400, f"tests/hub_server.py does not support {key!r} commit operations")
        if not summary:
            raise HubError(400, "A commit needs a summary")
        commit_id = self.server.new_commit_id()
        repo.commits[commit_id] = files
        repo.branches[revision] = commit_id
        commit_url = f"{self.server.url}/{URL_PREFIXES[kind]}{repo.repo_id}/commit/{commit_id}"
        return 200, {}, {"success": True, "commitOid": commit_id, "commitUrl": commit_url}

    def _resolve(self, kind: str, repo_id: str, revision: str, path: str):
        repo = self._repo(kind, repo_id)
        commit_id = repo.resolve(revision)
        files = repo.commits[commit_id]
        headers = {"X-Repo-Commit": commit_id}
        if path not in files:
            raise HubError(404, "Entry not found", "EntryNotFound", headers=headers)
        content = files[path]
        headers.update({"ETag": f'"{git_blob_id(content)}"', "Accept-Ranges": "none"})
        return 200, headers, content
