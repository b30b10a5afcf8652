"""SLURM node-list helpers with no heavy imports (the sbatch script calls them before any
environment is set up).

    python3 -m trainer.slurm hosts 'gpu[003-004,9],cpu1'     # one host per line
    python3 -m trainer.slurm first 'gpu[003-004,9],cpu1'     # gpu003
"""

import re
import sys

_GROUP = re.compile(r"([^,\[]+)(?:\[([^\]]+)\])?")


def expand_nodelist(nodelist: str) -> list:
    """Expand SLURM's compressed host list ('gpu[003-004,9],cpu1') like `scontrol show hostnames`."""
    hosts = []
    pos = 0
    text = nodelist.strip()
    while pos < len(text):
        match = _GROUP.match(text, pos)
        if not match:
            raise ValueError(f"cannot parse SLURM node list {nodelist!r} at {text[pos:]!r}")
        prefix, ranges = match.groups()
        if ranges is None:
            hosts.append(prefix)
        else:
            for part in ranges.split(","):
                lo, _, hi = part.partition("-")
                width = len(lo)
                for i in range(int(lo), int(hi or lo) + 1):
                    hosts.append(f"{prefix}{i:0{width}d}")
        pos = match.end()
        if pos < len(text) and text[pos] == ",":
            pos += 1
    return hosts


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("hosts", "first"):
        sys.exit(__doc__)
    expanded = expand_nodelist(sys.argv[2])
    print("\n".join(expanded if sys.argv[1] == "hosts" else expanded[:1]))
