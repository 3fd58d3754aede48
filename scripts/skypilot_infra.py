"""Write the infra names SkyPilot knows (its clouds, kubernetes, slurm, ssh, and their aliases) as JSON,
so `--cloud` is checked without importing SkyPilot:
    .venv/bin/python scripts/skypilot_infra.py > llm_atc/data/skypilot-infra.json
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    import sky
    from sky.utils import registry

    data = {
        "skypilot": sky.__version__,
        "infra": sorted(registry.CLOUD_REGISTRY.keys()),
        "aliases": dict(sorted(registry.CLOUD_REGISTRY._aliases.items())),
    }
    sys.stdout.write(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
