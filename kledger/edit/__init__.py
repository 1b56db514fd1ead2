"""The edit engine: model access and the math. The only part of kledger that imports torch and
transformers; import its modules directly (this package imports nothing heavy).

  spec     per-architecture table (layers, down-projection, declared weight orientation)
  weights  offline loading (default SmolLM2 via its GGUF package), fingerprints, saving
  hparams  HParams and per-model defaults (no torch)
  stats    C0 over a corpus; the default, model-sampled corpus
  hooks    scoped forward hooks and tokenisation helpers
  engine   EditRequest → constraints (keys, values, spreading); apply_constraints
  solve    the float64 least-squares solve and its modes (no model)
"""
