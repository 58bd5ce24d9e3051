"""`python -m agentmesh.pipelines.checkpoint_eval`: runs :func:`.job.main`."""

from __future__ import annotations

import sys

from agentmesh.pipelines.checkpoint_eval.job import main

if __name__ == "__main__":
    sys.exit(main())
