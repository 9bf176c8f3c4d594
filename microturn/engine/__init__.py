"""The streaming-session engine: resident sessions, the micro-turn timeline, one step per tick."""
