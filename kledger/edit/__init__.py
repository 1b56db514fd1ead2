"""The edit engine: model access and the math. The only part of kledger that imports torch and
transformers; import its modules directly (this package imports nothing heavy).

  spec     per-architecture table (layers, down-projection, declared weight orientation)
  weights  offline loading (default SmolLM2 via its GGUF package), fingerprints, saving
  hparams  HParams and per-model defaults (no torch)
  stats    C0 over a corpus; the default, model-sampled corpus
  hooks    scoped forward hooks and tokenisation helpers
  engine   EditRequest → constraints (keys, spreading)
  values   the value optimisation (the residual change per fact that makes the model say it)
  solve    the float64 least-squares solve and its modes (no model)
  cache    the apply cache: solved weights on disk (no torch)
  prior    small revisions solved by Woodbury on the kept inverse of λC0 (numpy, no torch)
  editor   Editor: a base model, its C0, the cached solve of constraints, measuring new ones;
           knows nothing of commits (kledger.model_side is the glue to them)
  ask      the model's answer and top next tokens
  evaluate CounterFact / ZsRE metrics, perplexity, fluency, the history plot
"""
