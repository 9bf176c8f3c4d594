"""The network face of the engine: `microturn serve`, WebSocket + HTTP, one shared tick loop."""
