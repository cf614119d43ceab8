"""The device-facing gRPC endpoint: mutual TLS, plus the revocation check gRPC lacks.

gRPC verifies the client certificate against the device CA during the handshake (so expired
and foreign certificates never get in), but Python gRPC has no CRL option. `DeviceGate`, a
server interceptor, therefore admits each call only if the registry knows the certificate's
serial and has not revoked it, and keeps a registry of open streams (`LiveStreams`) so that a
revocation ends the device's streams at once instead of at its next reconnect.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable

import grpc
from cryptography import x509
from google.protobuf.message import DecodeError

from controlplane.audit import REFUSED, AuditLog
from controlplane.errors import DeviceRefused
from controlplane.registry import Device, DeviceRegistry
from protocol import fleet_pb2, fleet_pb2_grpc
from provisioning.identity import serial_hex

MAX_STREAMS_PER_DEVICE = 16  # open streaming calls per certificate

_caller: contextvars.ContextVar[tuple[Device, x509.Certificate]] = contextvars.ContextVar(
    "edgefleet_grpc_caller"
)


def current_caller() -> tuple[Device, x509.Certificate]:
    """The device (and certificate) `DeviceGate` admitted for the call being served."""
    return _caller.get()


class LiveStreams:
    """Open streaming calls by certificate serial, so a revocation can end them."""

    def __init__(self) -> None:
        self._events: dict[str, set[asyncio.Event]] = defaultdict(set)

    def open(self, serial: str) -> asyncio.Event:
        event = asyncio.Event()
        self._events[serial].add(event)
        return event

    def close(self, serial: str, event: asyncio.Event) -> None:
        events = self._events.get(serial)
        if events is not None:
            events.discard(event)
            if not events:
                del self._events[serial]

    def count(self, serial: str) -> int:
        return len(self._events.get(serial, ()))

    def serials(self) -> list[str]:
        return list(self._events)

    def end(self, serials: list[str]) -> int:
        """Signal every stream of these serials to end; return how many there were."""
        ended = 0
        for serial in serials:
            for event in self._events.get(serial, ()):
                event.set()
                ended += 1
        return ended


class DeviceGate(grpc.aio.ServerInterceptor):
    """Admit only active devices of the registry, and end their streams when revoked."""

    def __init__(self, registry: DeviceRegistry, streams: LiveStreams, audit: AuditLog) -> None:
        self._registry = registry
        self._streams = streams
        self._audit = audit

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        # The wrappers get the request's bytes and decode them once the caller is admitted:
        # nothing a refused device sends is parsed, and bytes that are no message of the
        # method's type get INVALID_ARGUMENT rather than gRPC's UNKNOWN.
        decode = handler.request_deserializer
        serialize = handler.response_serializer
        if handler.unary_unary:
            behaviour = self._unary(handler.unary_unary, _one(decode), watch=False)
            return grpc.unary_unary_rpc_method_handler(behaviour, response_serializer=serialize)
        if handler.stream_unary:
            behaviour = self._unary(handler.stream_unary, _each(decode), watch=True)
            return grpc.stream_unary_rpc_method_handler(behaviour, response_serializer=serialize)
        if handler.unary_stream:
            behaviour = self._streaming(handler.unary_stream, _one(decode))
            return grpc.unary_stream_rpc_method_handler(behaviour, response_serializer=serialize)
        behaviour = self._streaming(handler.stream_stream, _each(decode))
        return grpc.stream_stream_rpc_method_handler(behaviour, response_serializer=serialize)

    async def _admit(self, context: grpc.aio.ServicerContext) -> tuple[Device, x509.Certificate]:
        pem = (context.auth_context().get("x509_pem_cert") or [b""])[0]
        cert = x509.load_pem_x509_certificate(pem) if pem else None
        try:
            device = self._registry.authenticate(cert)
        except DeviceRefused as exc:
            self._audit.record(
                "certificate.refused",
                REFUSED,
                serial=serial_hex(cert) if cert is not None else None,
                peer=context.peer(),
                detail=f"grpc: {exc}",
            )
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        return device, cert

    async def _watch(self, serial: str, context: grpc.aio.ServicerContext) -> asyncio.Event:
        """Register a long-lived call of this certificate, so a revocation can end it; at most
        MAX_STREAMS_PER_DEVICE at once (an agent holds one or two)."""
        if self._streams.count(serial) >= MAX_STREAMS_PER_DEVICE:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"certificate {serial} already holds {MAX_STREAMS_PER_DEVICE} open streams; "
                "close one first",
            )
        return self._streams.open(serial)

    def _unary(self, behaviour: Callable, decode: Callable, *, watch: bool):
        async def call(request, context):
            caller = await self._admit(context)
            _caller.set(caller)
            request = await decode(request, context)
            if not watch:
                return await behaviour(request, context)
            serial = serial_hex(caller[1])
            revoked = await self._watch(serial, context)
            try:
                return await _until_done(behaviour(request, context), revoked)
            except _Revoked:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, _revoked_text(caller))
            finally:
                self._streams.close(serial, revoked)

        return call

    def _streaming(self, behaviour: Callable, decode: Callable):
        # Streaming handlers are async generators (not `context.write` style).
        async def call(request, context) -> AsyncIterator:
            caller = await self._admit(context)
            _caller.set(caller)
            request = await decode(request, context)
            serial = serial_hex(caller[1])
            revoked = await self._watch(serial, context)
            try:
                async for reply in _until(behaviour(request, context), revoked):
                    yield reply
            except _Revoked:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, _revoked_text(caller))
            finally:
                self._streams.close(serial, revoked)

        return call


def _one(deserialize: Callable | None) -> Callable:
    """Decoding of a unary request, for a method whose deserializer is `deserialize`."""

    async def decode(raw: bytes, context: grpc.aio.ServicerContext):
        return await _message(deserialize, raw, context)

    return decode


def _each(deserialize: Callable | None) -> Callable:
    """Decoding of a request stream, message by message as the handler reads it."""

    async def decode(raws: AsyncIterator[bytes], context: grpc.aio.ServicerContext):
        async def messages():
            async for raw in raws:
                yield await _message(deserialize, raw, context)

        return messages()

    return decode


async def _message(deserialize: Callable | None, raw: bytes, context: grpc.aio.ServicerContext):
    if deserialize is None:
        return raw
    try:
        return deserialize(raw)
    except DecodeError:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, "the request is not a valid message of this method"
        )


def _revoked_text(caller: tuple[Device, x509.Certificate]) -> str:
    device, cert = caller
    return f"certificate {serial_hex(cert)} of device {device.device_id} was revoked"


class _Revoked(Exception):
    pass


async def _until(replies: AsyncIterator, revoked: asyncio.Event) -> AsyncIterator:
    """Yield from `replies` until it ends or `revoked` is set (then raise _Revoked)."""
    waiter = asyncio.ensure_future(revoked.wait())
    step = None
    try:
        while True:
            step = asyncio.ensure_future(anext(replies))
            done, _ = await asyncio.wait({step, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if waiter in done:
                step.cancel()
                await asyncio.gather(step, return_exceptions=True)
                raise _Revoked
            try:
                yield step.result()
            except StopAsyncIteration:
                return
    finally:
        waiter.cancel()
        if step is not None and step.done() and not step.cancelled():
            step.exception()  # cancelled (a stop) after the step ended: its outcome is seen
        elif step is not None:
            step.cancel()
        await replies.aclose()


async def _until_done(coro, revoked: asyncio.Event):
    """Await `coro` unless `revoked` is set first (then cancel it and raise _Revoked)."""
    task = asyncio.ensure_future(coro)
    waiter = asyncio.ensure_future(revoked.wait())
    try:
        done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if task not in done:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise _Revoked
        return task.result()
    finally:
        waiter.cancel()


class FleetServicer(fleet_pb2_grpc.FleetServicer):
    def __init__(self, region: str) -> None:
        self._region = region

    async def Hello(self, request, context):
        device, cert = current_caller()
        return fleet_pb2.HelloReply(
            device_id=device.device_id,
            region=device.region,
            server_region=self._region,
            certificate_serial=serial_hex(cert),
            certificate_not_after=int(cert.not_valid_after_utc.timestamp()),
            server_time_ms=_now_ms(),
        )

    async def Heartbeat(self, request_iterator, context):
        async for beat in request_iterator:
            yield fleet_pb2.BeatAck(seq=beat.seq, server_time_ms=_now_ms())


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
