"""Every replica's Prometheus metrics in one exposition: each series gains a `replica` label
(sum or compare them in PromQL), and two cluster gauges say how many replicas reported and
how many sessions they hold together."""

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families


class _Merged:
    def __init__(self, texts: dict[str, bytes]):
        self.texts = texts

    def collect(self):
        families: dict[str, Metric] = {}
        live = 0.0
        for replica, text in self.texts.items():
            for family in text_string_to_metric_families(text.decode()):
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(family.name, family.documentation,
                                                            family.type, family.unit)
                for sample in family.samples:
                    merged.samples.append(sample._replace(
                        labels={**sample.labels, "replica": replica}))
                    if sample.name == "microturn_live_sessions":
                        live += sample.value
        replicas = GaugeMetricFamily("microturn_cluster_replicas",
                                     "replicas that reported in the last 3 s")
        replicas.add_metric([], len(self.texts))
        sessions = GaugeMetricFamily("microturn_cluster_live_sessions",
                                     "sessions open on all replicas")
        sessions.add_metric([], live)
        yield replicas
        yield sessions
        yield from families.values()


def merged_metrics(texts: dict[str, bytes]) -> bytes:
    """texts: replica name -> its /metrics text."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(texts))
    return generate_latest(registry)
