"""Typed errors. Each carries its exit code; `kledger.cli` is the only place that turns them
into process exits. Messages are one line: what went wrong, then how to fix it."""

from __future__ import annotations

# Exit codes (documented in docs/exit-codes.md).
EXIT_OK = 0
EXIT_ERROR = 1  # the operation failed: ledger state, lock, integrity, model
EXIT_USAGE = 2  # the command line or its input is wrong: bad file, unknown revision, bad value
EXIT_CONFLICT = 3  # unresolved conflicts are present (commit/merge/cherry-pick refused, check failed)

# The fix for a damaged ledger that `kledger fsck` cannot mend.
RESTORE_HINT = "restore the ledger from a backup, or re-create it from an exported text ledger with `kledger init --from`"


class KledgerError(Exception):
    """Base class. `message` says what is wrong; `hint` says how to fix it."""

    exit_code = EXIT_ERROR
    kind = "error"

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        text = self.message.replace("\n", " ").strip()
        if self.hint:
            text += f" ({self.hint.strip()})"
        return text


class UsageError(KledgerError):
    exit_code = EXIT_USAGE
    kind = "usage"


class InputError(UsageError):
    """A file or value given by the user is malformed."""

    kind = "input"


class RevisionError(UsageError):
    kind = "revision"


class LedgerNotFound(KledgerError):
    kind = "no-ledger"


class LedgerLocked(KledgerError):
    kind = "locked"


class SchemaError(KledgerError):
    kind = "schema"


class StateError(KledgerError):
    """The ledger is in a state where the command cannot run (nothing staged, merge in progress…)."""

    kind = "state"


class IntegrityError(KledgerError):
    kind = "integrity"


class ConflictError(KledgerError):
    exit_code = EXIT_CONFLICT
    kind = "conflict"

    def __init__(self, message: str, hint: str | None = None, conflicts=None):
        super().__init__(message, hint)
        self.conflicts = list(conflicts or [])


class RemoteError(KledgerError):
    """A remote cannot be reached, read or written (network, permissions, a missing bucket), or
    the module its kind needs is not installed."""

    kind = "remote"


class ModelError(KledgerError):
    """Model loading, unsupported architecture, numerical failure during an edit."""

    kind = "model"


class MissingExtraError(ModelError):
    """A module of the `edit` extra (torch, transformers, ...) is not installed."""


class FingerprintError(KledgerError):
    """Stored constraints were measured on another base model, C0 or hyper-parameters."""

    kind = "fingerprint"


# The modules of the `edit` extra (pip install 'kledger[edit]'): the model side needs them, checking
# and the history never do.
MODEL_MODULES = frozenset({"torch", "transformers", "safetensors", "numpy", "accelerate", "gguf", "tokenizers"})
INSTALL_EDIT = "pip install 'kledger[edit]'"


def missing_model_module(exc: ImportError, doing: str = "this", replay_hint: bool = False) -> MissingExtraError | None:
    """The one-line error for an ImportError of a module of the `edit` extra (None for any other
    module): `doing` needs torch and transformers. `replay_hint`: also say how to replay a text
    ledger without measuring."""
    name = (exc.name or "").split(".")[0]
    if name not in MODEL_MODULES:
        return None
    hint = f"install the model side with `{INSTALL_EDIT}`"
    if replay_hint:
        hint += "; to replay a text ledger only to check it, add --no-measure (`kledger init DIR --from TEXT --no-measure`)"
    return MissingExtraError(f"{doing} needs torch and transformers (the `edit` extra), and {name} is not installed",
                             hint)
