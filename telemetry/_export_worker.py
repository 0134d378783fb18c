"""``python -m llmtrail.telemetry._export_worker``: the OTLP export helper (see _export_process).

A module of its own so that running it does not execute ``_export_process`` a second time
(the package imports that one).
"""

from __future__ import annotations

import sys

from ._export_process import main

if __name__ == "__main__":
    sys.exit(main())
