"""A tiny asyncio TCP proxy for fault injection between the services: pass, delay or freeze.

    proxy = StallProxy("127.0.0.1:50052")      # upstream address
    proxy.start()                               # own loop thread; proxy.target = "127.0.0.1:<port>"
    proxy.delay = 0.2                           # every forwarded read waits 200 ms
    proxy.freeze()                              # bytes stop flowing both ways; connections stay open
    proxy.thaw()
    proxy.stop()

Frozen means what a dead route or a stuck peer looks like from either end: TCP stays up, nothing
arrives, pings go unanswered.
"""

from __future__ import annotations

import asyncio
import threading


class StallProxy:
    def __init__(self, upstream: str):
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.delay = 0.0
        self.forwarded = 0  # bytes passed on, both directions
        self.connections = 0
        self._flowing: asyncio.Event | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="stall-proxy", daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.target = ""

    def _run(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> StallProxy:
        self._thread.start()

        async def start():
            self._flowing = asyncio.Event()
            self._flowing.set()
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            return self._server.sockets[0].getsockname()[1]

        self.target = f"127.0.0.1:{self._run(start())}"
        return self

    def freeze(self) -> None:
        self._loop.call_soon_threadsafe(self._flowing.clear)

    def thaw(self) -> None:
        self._loop.call_soon_threadsafe(self._flowing.set)

    def stop(self) -> None:
        async def stop():
            self._server.close()
            for w in self._writers:
                w.close()
            self._flowing.set()

        if self._thread.is_alive():
            self._run(stop())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        self.connections += 1
        self._writers += [writer, up_writer]
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                await self._flowing.wait()
                if self.delay:
                    await asyncio.sleep(self.delay)
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
                self.forwarded += len(data)
        finally:
            writer.close()
