"""A GPU node's nvidia-smi, the one part of a GPU node these tests stand in for (there is no GPU here)."""

from __future__ import annotations

import shlex
from pathlib import Path


def fake_nvidia_smi(bin_dir: Path, *, driver: str = "580.95.05", memory_mib: tuple[int, ...] = (81559,),
                    name: str = "NVIDIA H100 80GB HBM3") -> Path:  # fmt: skip
    """An ``nvidia-smi`` in ``bin_dir`` that lists ``len(memory_mib)`` GPUs and answers the queries the
    recipe makes (``-L``; ``--query-gpu=driver_version|memory.total|name --format=csv,noheader[,nounits]``)."""
    lines = {
        "-L": [f"GPU {i}: {name} (UUID: GPU-{i})" for i in range(len(memory_mib))],
        "--query-gpu=driver_version": [driver] * len(memory_mib),
        "--query-gpu=memory.total": [str(m) for m in memory_mib],
        "--query-gpu=name": [name] * len(memory_mib),
    }
    cases = "\n".join(f"  {flag}) printf '%s\\n' {shlex.join(values)} ;;" for flag, values in lines.items())
    script = bin_dir / "nvidia-smi"
    script.write_text(f'#!/bin/bash\ncase "$1" in\n{cases}\n  *) echo "unexpected: $*" >&2; exit 2 ;;\nesac\n')
    script.chmod(0o755)
    return script
