"""The terminal app: `hanlin` (or `hanlin tui`) opens it. Textual is imported only here.

Screens, in the order a user meets them: devices -> models -> tasks -> chat | fine-tune |
evaluate | serve. Each screen calls the SDK (hanlin.load, hanlin.history, hanlin.finetune,
hanlin.evaluate, the server's CLI) and holds no copy of its logic.
"""

from __future__ import annotations

from typing import Any


def run(**options: Any) -> int:
    from .app import HanlinApp

    app = HanlinApp(**options)
    app.run()
    return app.return_code or 0
