"""The chat agent's memory under load: what closed connections leave behind is freed within seconds.

Why (measured for issue 18, benchmarks/results/users.md): every TLS connection the chat node accepts gets an asyncio
SSLProtocol with a 256 KiB read buffer (asyncio.sslproto.SSLProtocol.max_size) and an OpenSSL connection. When the
connection closes, uvicorn's H11Protocol and its RequestResponseCycle still reference each other, so the connection
(buffer included) is freed by Python's cyclic garbage collector, not when it closes. That collector looks at the
oldest generation only when the number of long-lived objects has grown by a quarter: tens of thousands of objects
in this process, to which a closed connection (a hundred objects, but about 300 KB) barely counts. So closed
connections piled up (20-30 at a time with 8 people, whose clients reconnect after each think time), the C heap grew
to hold them, and glibc kept the space after they were finally freed: RSS rose for minutes, then stayed.

What this module does:
- `freeze()` after startup: gc.freeze() moves what the loaded application is made of (about 94 000 objects:
  modules, classes, routes, the first runtime) into the permanent generation, so a full collection only walks what
  was made since: about a millisecond instead of 50-100 ms on the 2-core machine kind.
- `keep_flat()` every COLLECT_EVERY_S: a full collection (closed connections freed within that time), then
  malloc_trim(0) on glibc, which hands the free pages inside the heap back to the system.
Frozen objects are never collected: what of the first runtime is cyclic stays after a SIGHUP reload replaces it
(once, bounded). `unfreeze()` at shutdown gives them back to the collector.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging

log = logging.getLogger("clawbot.chat.memory")

COLLECT_EVERY_S = 5.0


def _find_malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; absent on musl and elsewhere
    except (OSError, AttributeError):
        return None


_malloc_trim = _find_malloc_trim()


def freeze() -> int:
    """Collect what startup left over, then freeze everything alive into the permanent generation. Returns how many
    objects are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def unfreeze() -> None:
    gc.unfreeze()


def collect() -> int:
    """One full collection, then the freed heap back to the system where glibc allows. Returns the objects found
    unreachable."""
    found = gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)
    return found


async def keep_flat(every_s: float = COLLECT_EVERY_S) -> None:
    """Until cancelled: `collect()` every `every_s` seconds."""
    while True:
        await asyncio.sleep(every_s)
        try:
            collect()
        except Exception:  # never let housekeeping end the chat node
            log.exception("memory housekeeping failed")
