"""A store that lies, for the tests of sealed pages: a proxy on 127.0.0.1 in front of a
real store, which rewrites the pages it answers as a compromised store would.

Both directions go through netswap's own sans-IO Connection (the agent's requests
are received in the server role and sent on in the client role, the store's
replies the other way), so frames are parsed and rebuilt, never patched. A lying
store also recomputes each page's CRC tag for the slot and generation it claims
(protocol/checksum.page_tag): only the agent's AEAD check can catch it.

Modes, each aimed at one slot (`target`), set on the running proxy:
- "flip": one bit of the page;
- "swap": the page and seal of `target` with those of `other` (read in one request);
- "replay": the ciphertext and seal `target` had when first read, under the
  generation it has now.
"""

from __future__ import annotations

import asyncio
import threading
from array import array

from netswap.protocol import (
    CLOSED,
    NEED_DATA,
    PAGE_SIZE,
    SEAL_SIZE,
    Connection,
    Hello,
    Pages,
    Role,
    SwapIn,
    area_seed,
    page_tag,
)

# Bytes read per call from either side.
READ = 256 * 1024


class TamperProxy:
    def __init__(self, store: tuple[str, int]) -> None:
        self.store = store
        self.mode = ""
        self.target = self.other = -1
        self.first_seen: dict[int, tuple[bytes, bytes]] = {}  # slot -> (page, seal)
        self.tampered = 0
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        threading.Thread(target=self._run, daemon=True).start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._loop = asyncio.get_running_loop()
        self._ready.set()
        async with server:
            await server.serve_forever()

    async def _handle(self, agent_r: asyncio.StreamReader, agent_w: asyncio.StreamWriter) -> None:
        store_r, store_w = await asyncio.open_connection(*self.store)
        from_agent, to_store = Connection(Role.SERVER), Connection(Role.CLIENT)
        slots_of: dict[int, list[int]] = {}
        seed = [0]

        async def upstream() -> None:
            while data := await agent_r.read(READ):
                from_agent.receive_data(data)
                while (event := from_agent.next_event()) not in (NEED_DATA, CLOSED):
                    if isinstance(event, Hello):
                        seed[0] = area_seed(event.area)
                    if isinstance(event, SwapIn):
                        slots_of[event.request_id] = list(event.slots)
                    store_w.write(to_store.send(event))  # type: ignore[arg-type]
            store_w.close()

        async def downstream() -> None:
            while data := await store_r.read(READ):
                to_store.receive_data(data)
                while (event := to_store.next_event()) not in (NEED_DATA, CLOSED):
                    if isinstance(event, Pages):
                        event = self._lie(event, slots_of.pop(event.request_id, []), seed[0])
                    agent_w.write(from_agent.send(event))  # type: ignore[arg-type]
            agent_w.close()

        try:
            await asyncio.gather(upstream(), downstream())
        except (ConnectionError, OSError):
            agent_w.close()
            store_w.close()

    def _lie(self, reply: Pages, slots: list[int], seed: int) -> Pages:
        data, tags = bytearray(reply.data), array("I", reply.tags)
        gens = array("Q", reply.generations)
        seals = bytearray(reply.seals) if reply.seals is not None else None

        def page(i: int) -> memoryview:
            return memoryview(data)[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]

        def seal(i: int) -> memoryview:
            assert seals is not None
            return memoryview(seals)[i * SEAL_SIZE : (i + 1) * SEAL_SIZE]

        for i, slot in enumerate(slots):
            if seals is not None and slot not in self.first_seen:
                self.first_seen[slot] = (bytes(page(i)), bytes(seal(i)))
        if self.target not in slots:
            return reply
        t = slots.index(self.target)
        changed = [t]
        if self.mode == "flip":
            data[t * PAGE_SIZE + 100] ^= 0x10
        elif self.mode == "swap" and self.other in slots and seals is not None:
            o = slots.index(self.other)
            a, b = bytes(page(t)), bytes(page(o))
            page(t)[:], page(o)[:] = b, a
            sa, sb = bytes(seal(t)), bytes(seal(o))
            seal(t)[:], seal(o)[:] = sb, sa
            changed.append(o)
        elif self.mode == "replay" and seals is not None:
            old_page, old_seal = self.first_seen[self.target]
            if old_page == bytes(page(t)):
                return reply  # not rewritten since: nothing older to replay yet
            page(t)[:], seal(t)[:] = old_page, old_seal
        else:
            return reply
        for i in changed:  # a lying store makes its own check pass
            tags[i] = page_tag(page(i), seed, slots[i], gens[i])
        self.tampered += 1
        return Pages(reply.request_id, data, tags, gens, seals)
