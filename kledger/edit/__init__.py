"""The edit engine: model access (spec, weights), the statistics C0 (stats), the float64 solve
(solve), and keys and values (engine). Imports torch and transformers; nothing else in kledger does."""
