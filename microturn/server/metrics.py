"""Prometheus metrics of one server, in their own registry (several servers can share a process)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 1.0, 2.0)


class ServerMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.live_sessions = Gauge("microturn_live_sessions", "sessions open now", registry=r)
        self.sessions_opened = Counter("microturn_sessions_opened", "sessions opened",
                                       registry=r)
        self.sessions_refused = Counter("microturn_sessions_refused", "session opens refused",
                                        ["reason"], registry=r)
        self.sessions_closed = Counter("microturn_sessions_closed", "sessions closed",
                                       ["reason"], registry=r)
        self.tick_seconds = Histogram("microturn_tick_seconds", "one engine tick (all sessions)",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.tick_sessions = Histogram("microturn_tick_sessions", "sessions in one tick",
                                       buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.slice_latency = Histogram("microturn_slice_latency_seconds",
                                       "slice closed (or request arrived) -> output ready",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.deadline_misses = Counter("microturn_deadline_misses",
                                       "slices answered later than their slice duration",
                                       registry=r)
        self.input_tokens = Counter("microturn_input_tokens", "input tokens fed", registry=r)
        self.output_tokens = Counter("microturn_output_tokens", "tokens the model emitted",
                                     registry=r)
        self.audio_seconds = Counter("microturn_audio_seconds", "audio received (seconds of "
                                     "sound)", registry=r)
        self.images = Counter("microturn_images", "video frames received", registry=r)
        self.kv_blocks_used = Gauge("microturn_kv_blocks_used", "KV pool blocks in use",
                                    registry=r)
        self.kv_blocks_total = Gauge("microturn_kv_blocks_total", "KV pool blocks", registry=r)
        self.kv_bytes_used = Gauge("microturn_kv_bytes_used", "KV pool bytes in use", registry=r)
        self.checkpoints = Counter("microturn_checkpoints", "session checkpoints written",
                                   registry=r)
        self.client_errors = Counter("microturn_client_errors", "bad input refused, by code",
                                     ["code"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
