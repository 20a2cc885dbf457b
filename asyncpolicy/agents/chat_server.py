"""`/v1/chat/completions` for black-box agents, one base URL per episode (starlette + uvicorn).

An agent gets `http://127.0.0.1:PORT/episodes/<id>/v1` as its OpenAI base URL; the id routes each
call to its episode's `AgentConversation`, so thousands of episodes share one server and one
event loop. The server runs as a task of its owner's task group (`ChatServer.serve`); stopping is
cancelling that group. Errors are OpenAI-shaped: 404 for an episode that is not running, 400 for
a history the runtime refuses (see conversation.py).
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import anyio
import anyio.abc
import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from asyncpolicy.errors import ConfigError
from asyncpolicy.agents.conversation import AgentConversation, HistoryMismatch, parse_messages


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status_code=status)


SHUTDOWN_S = 2  # seconds of uvicorn's graceful shutdown of the endpoint: requests still running after it are cancelled


class ChatServer:
    """Episodes by id, and the app that serves them."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port  # port 0 = a free one, known once `serve` has started
        self._sock: socket.socket | None = None
        self._episodes: dict[str, AgentConversation] = {}
        self._ids = itertools.count()

    @contextmanager
    def episode(self, conversation: AgentConversation) -> Iterator[str]:
        """Route an episode-scoped base URL to `conversation` while the block runs (`serve` has started)."""
        if self._sock is None:
            raise RuntimeError("ChatServer.episode: the server has not started (start `serve` in a task group first)")
        eid = f"e{next(self._ids)}"
        self._episodes[eid] = conversation
        try:
            yield f"http://{self.host}:{self.port}/episodes/{eid}/v1"
        finally:
            del self._episodes[eid]

    async def _complete(self, request: Request) -> Response:
        conversation = self._episodes.get(request.path_params["eid"])
        if conversation is None:
            return _error(404, f"episode {request.path_params['eid']!r} is not running")
        try:
            body = msgspec.json.decode(await request.body())
            max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") if isinstance(body, dict) else None
            text, finish = await conversation.complete(parse_messages(body), int(max_tokens) if max_tokens else None)
        except msgspec.DecodeError as exc:
            return _error(400, f"the body is not JSON: {exc}")
        except HistoryMismatch as exc:
            return _error(400, str(exc))
        return JSONResponse(
            {
                "id": f"chatcmpl-{request.path_params['eid']}-{len(conversation.messages)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": str(body.get("model", "policy")),
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length" if finish == "length" else "stop"}
                ],
                "usage": {"prompt_tokens": len(conversation.context), "completion_tokens": len(conversation.last_turn),
                          "total_tokens": len(conversation.context) + len(conversation.record.tokens)},
            }
        )

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/episodes/{eid}/v1/chat/completions", self._complete, methods=["POST"])])

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Bind, report started (the port is known: calls wait in the listen backlog until uvicorn
        accepts them), serve until cancelled (the owner's task group). Binding fails with ConfigError (bad input).
        uvicorn's own signal handlers are not installed.

        A cancel ends it through uvicorn's own shutdown (`should_exit`), not by cancelling uvicorn:
        cancelled, uvicorn leaves its listening socket and its connections registered with the event
        loop, and once their descriptors are closed and reused the loop's next registration of the
        same number fails (epoll: ENOENT) — a host that runs a second Supervisor in the same loop saw
        its agents' first call fail. The shutdown is bounded (`SHUTDOWN_S`, then uvicorn cancels the
        requests still running; past `SHUTDOWN_S + 5` it is cancelled after all)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # trio: uvicorn would fail inside with "no running event loop"
            raise ConfigError(
                "config key 'task.agent': the agents' endpoint (uvicorn) runs on asyncio; this Supervisor runs on another "
                "event loop (trio)",
                key="task.agent",
            ) from None
        import uvicorn

        class _NoSignals(uvicorn.Server):
            @contextmanager
            def capture_signals(self) -> Iterator[None]:  # the Supervisor (or the host) owns the signals
                yield

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((self.host, self.port))
                sock.listen(1024)
            except OSError as e:  # a port in use or an address not on this host: the user's setting, not a crash
                key = "task.agent_port" if e.errno == errno.EADDRINUSE else "task.agent_host"
                raise ConfigError(f"config key '{key}': the agents' endpoint cannot listen on {self.host}:{self.port}: {e.strerror}", key=key) from e
            self._sock, self.port = sock, sock.getsockname()[1]
            server = _NoSignals(
                uvicorn.Config(self.app(), log_level="warning", lifespan="off", timeout_graceful_shutdown=SHUTDOWN_S)
            )

            serving = anyio.CancelScope(shield=True)  # given a deadline once the shutdown begins

            async def run_uvicorn() -> None:
                with serving:
                    await server.serve(sockets=[sock])

            async with anyio.create_task_group() as tg:
                tg.start_soon(run_uvicorn)
                task_status.started()
                try:
                    await anyio.sleep_forever()
                finally:
                    server.should_exit = True  # uvicorn's shutdown: stop accepting, close connections, end requests
                    serving.deadline = anyio.current_time() + SHUTDOWN_S + 5
        finally:  # `_sock` stays set: an episode starting while its owner's group is cancelled gets a URL that refuses calls
            sock.close()
