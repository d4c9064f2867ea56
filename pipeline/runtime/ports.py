"""Choosing a TCP port for a process that is started next and binds it a moment later.

Only for listeners whose port must be known before they start (a Ray head's GCS and dashboard, the
test services). Everything else is better off binding port 0 itself and reporting what it got:
nothing can take its port in between. Standard library only, so infra/local/stack.py can use it.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

# Below this, Ray's own default range for worker processes (10002-19999) and the well-known ports.
LOWEST = 20000
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_pick = random.SystemRandom()  # not the `random` module's state, which tests and libraries seed


def _outgoing_ports_start() -> int:
    """The first port of the kernel's range for outgoing connections' local ports."""
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_local_port() -> int:
    """A port on loopback that nothing listens on now.

    Picked at random below the kernel's range for outgoing connections: a port from that range
    (what binding port 0 gives) can be taken by any connection this machine opens between the pick
    and the listener's bind, and on a busy machine (a Ray cluster opens connections all the time)
    that happens. Random, so that two processes picking at once rarely meet; checked by a bind."""
    highest = _outgoing_ports_start() - 1
    if highest - LOWEST >= 1000:
        for _ in range(100):
            port = _pick.randint(LOWEST, highest)
            if _bindable(port):
                return port
    with socket.socket() as probe:  # no room below that range: whatever the kernel gives
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# `ray start` flags for a node that shares its machine's address with other nodes (a stand-in
# cluster, or tests running side by side): each of its listeners binds a port of its own choosing
# and reports it, instead of Ray's fixed defaults (the dashboard agent's 52365, workers' 10002-19999),
# which a second node on the machine would find taken. Listeners not named here (the node manager,
# object manager, metrics, runtime-env agent) bind this way by default.
RAY_NODE_PORTS_OF_ITS_OWN = ["--min-worker-port=0", "--max-worker-port=0", "--dashboard-agent-listen-port=0"]
