"""kledger: a versioned, git-like ledger of factual edits to transformer language models.

The library API is :class:`kledger.ledger.Ledger`. Importing this package is cheap: torch and
transformers are imported only by the edit engine, when a command needs a model.
"""

__version__ = "0.1.0"
