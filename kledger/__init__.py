"""kledger: a versioned, git-like ledger of factual edits to transformer language models.

The public API, re-exported here: `Ledger` (the facade: one method per verb), the records `Fact`,
`Commit`, `Constraint` and `Conflict`, the `Settings` read from the environment, and the error
type `KledgerError` (each error has a one-line message, a hint and an exit code).

    from kledger import Ledger, Fact
    with Ledger.open(write=True) as lg:
        lg.add([Fact.create("The Eiffel Tower is located in", "Rome", "Eiffel Tower")])
        lg.commit("Move the tower")

Importing this package is cheap: the names load on first use (PEP 562), and torch and
transformers are imported only by the edit engine, when a verb needs the model.
"""

__version__ = "0.1.0"

_EXPORTS = {"Ledger": "ledger", "Fact": "records", "Commit": "records", "Constraint": "records",
            "Conflict": "conflicts", "KledgerError": "errors", "Settings": "settings"}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        from importlib import import_module

        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kledger' has no attribute {name!r}")
