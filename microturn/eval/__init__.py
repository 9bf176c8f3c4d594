"""Interactivity evaluation: scenarios on the micro-turn clock, timing metrics, and the systems
they compare (micro-turn mode through the engine, a turn-based VAD harness)."""
