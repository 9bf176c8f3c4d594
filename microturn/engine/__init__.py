"""The streaming-session engine: resident sessions on a KV block pool, one batched step per tick."""
