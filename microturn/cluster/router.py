"""Session-affinity routing for Ray Serve (its request-router API): every request of a session
goes to the replica that holds its KV; a new session goes to the least-loaded replica.

A request names its session by the `x-session-id` header (Ray Serve's own session header;
`microturn.client` sends it), else by its path (`/v1/sessions/<id>...`) or `?session=<id>`.
Its home, first match wins:
1. where this router last sent it (a resumed session's new home, at once);
2. the replica whose routing stats list it (each replica reports its sessions twice a second);
3. the replica its id names (a replica mints ids as `<its name>-<random>`).
A session with no live home (its replica died, or is draining and handed it over) goes to the
least-loaded replica and stays there; that replica resumes it from the shared checkpoint
store when the client asks (`resume_session`).

Least loaded: fewest live sessions, then the most tick headroom; draining replicas take no
new sessions. A replica's sessions are what its last report lists, or, when more, the
WebSocket sessions this router has open to it (one request each, counted from routing to
completion: exact and at once), plus the HTTP sessions sent to it since its report.
"""

import pickle
import re
from collections import OrderedDict
from urllib.parse import parse_qs

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

SESSION_PATH = re.compile(r"^/v1/sessions/([^/]+)")
STREAM_PATHS = ("/v1/stream", "/v1/realtime")  # a WebSocket: a session for as long as it lasts
OPEN_PATH = "/v1/sessions"  # POST: an HTTP session
MEMORY = 100_000  # sessions whose home this router remembers (least recently routed dropped)


def session_of(request: PendingRequest | None) -> tuple[str | None, str | None]:
    """The session a request is for, and what it may open: "stream", "http" or None."""
    if request is None:
        return None, None
    scope = {}
    if request.args and isinstance(request.args[0], bytes):
        try:  # an HTTP or WebSocket request from Ray's proxy: its pickled ASGI scope
            scope = pickle.loads(request.args[0]).asgi_scope
        except Exception:
            scope = {}
    path = scope.get("path", "")
    opens = "stream" if path in STREAM_PATHS else "http" if path == OPEN_PATH else None
    if request.metadata.session_id:
        return request.metadata.session_id, opens
    found = SESSION_PATH.match(path)
    if found:
        return found.group(1), None
    query = parse_qs(scope.get("query_string", b"").decode(errors="replace"))
    return (query.get("session") or [None])[0], opens


class SessionRouter(RequestRouter):
    def initialize_state(self, **kwargs) -> None:
        self.homes: OrderedDict[str, str] = OrderedDict()  # session -> replica name
        self.sent_since: dict[str, tuple[float, int]] = {}  # name -> (report time, HTTP opens)
        self.streams: dict[str, set[str]] = {}  # name -> its open WebSocket requests' ids
        self.stream_home: dict[str, str] = {}  # a WebSocket request's id -> replica name

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        session, opens = session_of(pending_request)
        home = None if session is None else self.home_of(session, candidate_replicas)
        ranked = [home] if home is not None else self.least_loaded(candidate_replicas)
        chosen = ranked[0]
        if opens == "http":
            self._count_new(chosen)
        elif opens == "stream":
            self._stream_to(pending_request.metadata.internal_request_id,
                            chosen.replica_id.unique_id)
        if session is not None:
            self._remember(session, chosen)
        return [[r] for r in ranked]

    def on_request_routed(self, pending_request: PendingRequest, replica_id, result) -> None:
        request = pending_request.metadata.internal_request_id
        if request in self.stream_home:  # where it really went (a retry may differ)
            self._stream_to(request, replica_id.unique_id)

    def on_request_completed(self, replica_id, internal_request_id: str) -> None:
        name = self.stream_home.pop(internal_request_id, None)
        if name is not None:
            self.streams[name].discard(internal_request_id)

    def _stream_to(self, request: str, name: str) -> None:
        old = self.stream_home.get(request)
        if old is not None:
            self.streams[old].discard(request)
        self.stream_home[request] = name
        self.streams.setdefault(name, set()).add(request)

    def home_of(self, session: str, replicas: list[RunningReplica]) -> RunningReplica | None:
        by_name = {r.replica_id.unique_id: r for r in replicas
                   if not r.routing_stats.get("draining")}
        remembered = self.homes.get(session)
        if remembered in by_name:
            return by_name[remembered]
        for replica in by_name.values():
            if session in replica.routing_stats.get("sessions", ()):
                return replica
        return by_name.get(session.split("-", 1)[0])

    def least_loaded(self, replicas: list[RunningReplica]) -> list[RunningReplica]:
        """Every replica, best first; draining ones last (if nothing else is left)."""
        def load(r: RunningReplica):
            name, stats = r.replica_id.unique_id, r.routing_stats
            since = self.sent_since.get(name)
            http_opens = since[1] if since and since[0] == stats.get("at") else 0
            sessions = max(len(stats.get("sessions", ())), len(self.streams.get(name, ())))
            return (bool(stats.get("draining")), sessions + http_opens,
                    -stats.get("headroom", 1.0), name)
        return sorted(replicas, key=load)

    def _count_new(self, replica: RunningReplica) -> None:
        name, at = replica.replica_id.unique_id, replica.routing_stats.get("at")
        since = self.sent_since.get(name)
        self.sent_since[name] = (at, since[1] + 1 if since and since[0] == at else 1)

    def _remember(self, session: str, replica: RunningReplica) -> None:
        self.homes[session] = replica.replica_id.unique_id
        self.homes.move_to_end(session)
        if len(self.homes) > MEMORY:
            self.homes.popitem(last=False)
