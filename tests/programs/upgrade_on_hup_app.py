"""``tests/programs/upgrade_app.py``'s program, run by ``nd.run(sup, on_hup="upgrade",
pid_file=PATH)``: ``python tests/programs/upgrade_on_hup_app.py PATH``.

SIGHUP upgrades it (as SIGUSR2 does) instead of restarting every service, and PATH
names the running generation. Settings come from upgrade_app's environment variables.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

import nursery_down as nd

APP = runpy.run_path(str(Path(__file__).resolve().parent / "upgrade_app.py"))
sup: nd.Supervisor = APP["sup"]

if __name__ == "__main__":
    raise SystemExit(
        nd.run(
            sup,
            dashboard=os.environ.get("UPGRADE_APP_DASHBOARD") or None,
            upgrade_timeout=float(os.environ.get("UPGRADE_APP_TIMEOUT", "60")),
            on_hup="upgrade",
            pid_file=sys.argv[1],
        )
    )
