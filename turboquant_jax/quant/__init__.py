"""Pure-functional quantizer primitives: no Flax, no Pallas."""
