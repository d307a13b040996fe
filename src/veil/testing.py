"""Test helpers: run the two roles of a protocol against each other.

``run_parties(fn_a, fn_b, transport=...)`` calls ``fn_a(channel, *args_a)`` and
``fn_b(channel, *args_b)`` on the two ends of one channel and returns ``(result_a, result_b)``.

* ``transport="memory"``: two threads over :class:`veil.comm.MemoryChannel` (results are the
  objects the functions returned).
* ``transport="grpc"``: two OS processes (multiprocessing ``spawn``) over
  :class:`veil.comm.GrpcChannel` with mutual TLS on 127.0.0.1: throwaway identities are created
  in a temporary directory and each side pins the other's fingerprint; party ``a`` listens on a
  free port, party ``b`` connects. Functions must be importable top-level functions.

  Arguments and results cross between the test process and its two children through
  multiprocessing pipes, i.e. **pickle**. That is acceptable here only because all three
  processes are our own, on the same host, within one test: there is no trust boundary.
  The parties themselves talk only through the channel (msgspec, never pickle). Failures come
  back as plain strings (type name, message, traceback text), not pickled exceptions.

The first failure on either side is raised in the caller (a failure that is only the echo of
the other side's failure, such as PeerError, is raised only if nothing better is known), with
a note naming the party and, for processes, the remote traceback; the other side is aborted so
it does not wait. Nothing waits past ``timeout`` seconds: a party still running then is
aborted (threads) or killed (processes) and ChannelTimeout is raised.
"""

from __future__ import annotations

import importlib
import multiprocessing
import multiprocessing.connection
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from veil.comm.channel import FrameChannel, MemoryChannel
from veil.errors import ChannelClosed, ChannelTimeout, ConfigError, PeerError, VeilError

__all__ = ["PartyFailure", "run_parties"]

_SECONDARY = (PeerError, ChannelClosed)
_AFTER_FAILURE_GRACE = 10.0


class PartyFailure(VeilError):
    """A party failed with an exception that cannot be rebuilt in the caller's process."""


@dataclass
class _Outcome:
    party: str
    ok: bool
    at: float
    result: Any = None
    error: BaseException | None = None


def _pick_failure(outcomes: Sequence[_Outcome]) -> _Outcome | None:
    failed = [o for o in outcomes if not o.ok]
    if not failed:
        return None
    primary = [o for o in failed if not isinstance(o.error, _SECONDARY)]
    return min(primary or failed, key=lambda o: o.at)


def run_parties(
    fn_a: Callable[..., Any],
    fn_b: Callable[..., Any],
    transport: str = "memory",
    timeout: float = 120.0,
    args_a: Sequence[Any] = (),
    args_b: Sequence[Any] = (),
) -> tuple[Any, Any]:
    """Run two roles against each other; returns ``(result_a, result_b)`` (see module doc)."""
    if not timeout > 0:
        raise ConfigError(f"timeout must be positive, got {timeout}")
    if transport == "memory":
        return _run_threads(fn_a, fn_b, float(timeout), tuple(args_a), tuple(args_b))
    if transport == "grpc":
        return _run_processes(fn_a, fn_b, float(timeout), tuple(args_a), tuple(args_b))
    raise ConfigError(f"unknown transport {transport!r}; use 'memory' or 'grpc'")


def _abort_reason(party: str, exc: BaseException) -> str:
    return f"party {party} failed: {type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------------- threads


def _run_threads(
    fn_a: Callable[..., Any], fn_b: Callable[..., Any], timeout: float, args_a: tuple[Any, ...],
    args_b: tuple[Any, ...],
) -> tuple[Any, Any]:
    chan_a, chan_b = MemoryChannel.pair(timeout=timeout)
    outcomes: dict[str, _Outcome] = {}
    done = threading.Condition()

    def role(party: str, fn: Callable[..., Any], chan: FrameChannel, args: tuple[Any, ...]) -> None:
        try:
            result = fn(chan, *args)
        except BaseException as exc:
            with done:
                outcomes[party] = _Outcome(party, False, time.monotonic(), error=exc)
                done.notify_all()
            chan.abort(_abort_reason(party, exc))
            return
        chan.close()
        with done:
            outcomes[party] = _Outcome(party, True, time.monotonic(), result=result)
            done.notify_all()

    threads = [
        threading.Thread(target=role, args=("a", fn_a, chan_a, args_a), name="veil-party-a", daemon=True),
        threading.Thread(target=role, args=("b", fn_b, chan_b, args_b), name="veil-party-b", daemon=True),
    ]
    deadline = time.monotonic() + timeout
    for t in threads:
        t.start()
    with done:
        while len(outcomes) < 2:
            now = time.monotonic()
            limit = deadline
            if any(not o.ok for o in outcomes.values()):
                first_fail = min(o.at for o in outcomes.values() if not o.ok)
                limit = min(deadline, first_fail + _AFTER_FAILURE_GRACE)
            if now >= limit:
                break
            done.wait(limit - now)
        snapshot = list(outcomes.values())
    if len(snapshot) < 2:
        for chan in (chan_a, chan_b):
            chan.abort("run_parties: timed out")
    failure = _pick_failure(snapshot)
    if failure is not None and failure.error is not None:
        err = failure.error
        err.add_note(f"(raised in party {failure.party}, memory transport)")
        raise err
    if len(snapshot) < 2:
        missing = sorted({"a", "b"} - {o.party for o in snapshot})
        raise ChannelTimeout(f"run_parties: party {', '.join(missing)} did not finish within {timeout:g} s")
    by = {o.party: o for o in snapshot}
    return by["a"].result, by["b"].result


# ---------------------------------------------------------------------------------- processes


def _child(
    party: str,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    ident_dir: str,
    peer_cert: str,
    address: str | None,
    conn: multiprocessing.connection.Connection,
    timeout: float,
) -> None:
    from veil.comm.grpc_channel import GrpcChannel
    from veil.comm.identity import PartyIdentity

    chan: FrameChannel | None = None
    try:
        ident = PartyIdentity.load(ident_dir)
        if address is None:
            chan = GrpcChannel.listen(
                "127.0.0.1:0", ident, peer_cert=peer_cert, timeout=timeout,
                on_bound=lambda port: conn.send(("port", port)),
            )
        else:
            chan = GrpcChannel.connect(address, ident, peer_cert=peer_cert, timeout=timeout)
        result = fn(chan, *args)
    except BaseException as exc:
        cls = type(exc)
        tb = "".join(traceback.format_exception(exc))
        try:
            conn.send(("err", cls.__module__, cls.__qualname__, str(exc), tb))
        finally:
            if chan is not None:
                chan.abort(_abort_reason(party, exc))
        return
    # close first: it flushes what we sent until the peer has read it or closed too, and the
    # parent may kill a child soon after it reports
    chan.close()
    try:
        conn.send(("ok", result))
    except Exception as exc:  # an unpicklable result
        why = f"result of party {party} cannot be sent back: {exc}"
        conn.send(("err", "veil.testing", "PartyFailure", why, ""))


def _rebuild(party: str, module: str, qualname: str, message: str, tb: str) -> BaseException:
    cls: Any = None
    if module == "builtins" or module == "veil" or module.startswith("veil."):
        try:
            obj: Any = importlib.import_module(module)
            for part in qualname.split("."):
                obj = getattr(obj, part)
            cls = obj
        except (ImportError, AttributeError):
            cls = None
    exc: BaseException | None = None
    if isinstance(cls, type) and issubclass(cls, BaseException):
        try:
            exc = cls(message)
        except Exception:
            exc = None
    if exc is None:
        exc = PartyFailure(f"{module}.{qualname}: {message}")
    note = f"(raised in party {party}, separate process over grpc)"
    if tb:
        note += f"\n--- remote traceback of party {party} ---\n{tb.rstrip()}"
    exc.add_note(note)
    return exc


def _run_processes(
    fn_a: Callable[..., Any], fn_b: Callable[..., Any], timeout: float, args_a: tuple[Any, ...],
    args_b: tuple[Any, ...],
) -> tuple[Any, Any]:
    from veil.comm.identity import PartyIdentity

    deadline = time.monotonic() + timeout
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="veil-parties-") as tmp:
        dir_a, dir_b = Path(tmp) / "a", Path(tmp) / "b"
        PartyIdentity.create("party-a", dir_a)
        PartyIdentity.create("party-b", dir_b)
        cert_a, cert_b = str(dir_a / "cert.pem"), str(dir_b / "cert.pem")
        recv_a, send_a = ctx.Pipe(duplex=False)
        recv_b, send_b = ctx.Pipe(duplex=False)
        procs: dict[str, Any] = {}
        conns = {"a": recv_a, "b": recv_b}
        outcomes: dict[str, _Outcome] = {}
        try:
            procs["a"] = ctx.Process(
                target=_child, args=("a", fn_a, args_a, str(dir_a), cert_b, None, send_a, timeout),
                name="veil-party-a", daemon=True,
            )
            procs["a"].start()
            send_a.close()
            # wait for party a to report its port (or fail)
            port: int | None = None
            while port is None and "a" not in outcomes:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if recv_a.poll(min(left, 0.5)):
                    try:
                        msg = recv_a.recv()
                    except EOFError:
                        outcomes["a"] = _dead(procs["a"], "a")
                        break
                    if msg[0] == "port":
                        port = int(msg[1])
                    else:
                        outcomes["a"] = _from_report("a", msg)
                elif not procs["a"].is_alive():
                    outcomes["a"] = _dead(procs["a"], "a")
            if port is not None:
                procs["b"] = ctx.Process(
                    target=_child,
                    args=("b", fn_b, args_b, str(dir_b), cert_a, f"127.0.0.1:{port}", send_b, timeout),
                    name="veil-party-b", daemon=True,
                )
                procs["b"].start()
            send_b.close()
            _collect(procs, conns, outcomes, deadline)
        finally:
            for party, p in procs.items():
                if party in outcomes:  # reported: let it finish closing its channel
                    p.join(timeout=5.0)
                if p.is_alive():  # still running past the deadline (or stuck): kill our own child
                    p.kill()
                    p.join(timeout=5)
            recv_a.close()
            recv_b.close()
    failure = _pick_failure(list(outcomes.values()))
    if failure is not None and failure.error is not None:
        raise failure.error
    if len(outcomes) < 2:
        missing = sorted({"a", "b"} - set(outcomes))
        raise ChannelTimeout(
            f"run_parties: party {', '.join(missing)} did not finish within {timeout:g} s (grpc transport)"
        )
    return outcomes["a"].result, outcomes["b"].result


def _from_report(party: str, msg: tuple[Any, ...]) -> _Outcome:
    if msg[0] == "ok":
        return _Outcome(party, True, time.monotonic(), result=msg[1])
    _, module, qualname, message, tb = msg
    return _Outcome(party, False, time.monotonic(), error=_rebuild(party, module, qualname, message, tb))


def _dead(proc: Any, party: str) -> _Outcome:
    proc.join(timeout=1)
    return _Outcome(
        party, False, time.monotonic(),
        error=PartyFailure(f"party {party} process exited (code {proc.exitcode}) without reporting a result"),
    )


def _collect(
    procs: dict[str, Any], conns: dict[str, multiprocessing.connection.Connection],
    outcomes: dict[str, _Outcome], deadline: float,
) -> None:
    while len(outcomes) < 2:
        limit = deadline
        fails = [o.at for o in outcomes.values() if not o.ok]
        if fails:
            limit = min(deadline, min(fails) + _AFTER_FAILURE_GRACE)
        left = limit - time.monotonic()
        if left <= 0:
            return
        waiting = {party: conns[party] for party in procs if party not in outcomes}
        if not waiting:
            return
        ready = multiprocessing.connection.wait(list(waiting.values()), timeout=min(left, 0.5))
        for party, conn in waiting.items():
            if conn in ready:
                try:
                    msg = conn.recv()
                except EOFError:
                    outcomes[party] = _dead(procs[party], party)
                    continue
                if msg[0] != "port":
                    outcomes[party] = _from_report(party, msg)
            elif not procs[party].is_alive() and not conn.poll():
                outcomes[party] = _dead(procs[party], party)

