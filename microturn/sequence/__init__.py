"""The micro-turn sequence format, the ground floor: the timeline, its marker and media tokens,
and the media specs (dMel framing, video frames, the audio rate). It needs no model; the engine,
the front-end, the trainer and the server all build on it."""
