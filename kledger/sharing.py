"""The remote verbs of the facade (`Ledger` inherits them): clone, fetch, push, pull and the
remotes, each a call into kledger.remotes, which is imported only when one of them runs (or when
`status` finds the ledger tracks a remote), so that the most-run reads stay cheap."""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .ledger import Ledger
    from .settings import Settings


class RemoteVerbs:
    """Mixed into `Ledger`: `self` is the ledger."""

    store: Any

    def _upstream(self) -> dict | None:
        """kledger.remotes.upstream, for a ledger that tracks a remote; None (nothing imported) else."""
        from .history import TRACKING_KEY

        if not self.store.meta(TRACKING_KEY):
            return None
        from . import remotes

        return remotes.upstream(self)

    def remotes(self) -> dict[str, str]:
        from . import remotes

        return remotes.remotes(self)

    def add_remote(self, name: str, url: str) -> dict:
        from . import remotes

        return remotes.add_remote(self, name, url)

    def remove_remote(self, name: str) -> dict:
        from . import remotes

        return remotes.remove_remote(self, name)

    def fetch(self, name: str | None = None) -> dict:
        from . import remotes

        return remotes.fetch(self, name)

    def push(self, name: str | None = None, branch: str | None = None, force: bool = False) -> dict:
        from . import remotes

        return remotes.push(self, name, branch, force)

    def pull(self, name: str | None = None, branch: str | None = None, author: str | None = None,
             allow_conflicts: bool = False) -> dict:
        from . import remotes

        return remotes.pull(self, name, branch, author, allow_conflicts)

    @classmethod
    def clone(cls, url: str, directory: str | None = None, env: Settings | None = None) -> tuple["Ledger", dict]:
        """A new ledger in `directory` (default: the remote's folder name, here) holding everything
        the remote at `url` holds, its head branch checked out; nothing is left on a failure."""
        from . import remotes
        from .store import LEDGER_DIR

        _, doc, target = remotes.check_clone_target(url, directory)
        model, settings = remotes.source_meta(doc)
        existed = target.exists()
        lg = cls.init(target, model=model, settings=settings, env=env, check_model=False)  # type: ignore[attr-defined]
        try:
            return lg, remotes.finish_clone(lg, url, doc)
        except BaseException:
            lg.close()
            shutil.rmtree(target / LEDGER_DIR, ignore_errors=True)
            if not existed:
                shutil.rmtree(target, ignore_errors=True)
            raise
