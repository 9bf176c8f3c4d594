"""The encoder-free front-end: dMel audio, 40x40-patch video and text in one timeline."""
