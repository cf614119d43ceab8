"""Certificate renewal: at 2/3 of the lifetime, over the current mTLS identity, without restart.

The renewer sleeps until two thirds of the certificate's lifetime have passed (ten days before
expiry for the default 30 days: room for a long outage), then makes a new key pair, sends a CSR
to `POST /v1/devices/self/renew` authenticated by the current certificate, stores the result as
a new generation and calls its listeners with the new credentials: that is how the sync client
and anything else holding a TLS connection pick up the certificate without a restart. Local
serving on 127.0.0.1 does not use the device certificate and never stops.

Clock skew: the CA backdates certificates by an hour, the renewal margin is days, sleeps are
capped so a clock that jumps (NTP after boot) is noticed, and the device never discards its
certificate on its own clock's say-so: it keeps trying and lets the control plane decide.
The clock and the sleep are parameters, so tests move time without waiting.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509

from agent.identity.client import TIMEOUT_S, post_json
from agent.identity.enroll import check_issued, enrollment_record
from agent.identity.errors import CertificateExpired, IdentityError
from agent.identity.store import DeviceCredentials, IdentityStore
from provisioning.ca import RENEW_AT, renewal_time, utc_now
from provisioning.csr import build_csr
from provisioning.identity import device_identity_of, serial_hex
from provisioning.keys import new_private_key

log = logging.getLogger(__name__)

Listener = Callable[[DeviceCredentials], Awaitable[None] | None]


@dataclass(frozen=True, slots=True)
class RenewalPolicy:
    # Renew once this fraction of the certificate's lifetime has passed.
    at_fraction: float = RENEW_AT
    # Look at the clock at least this often, so a clock jump is noticed.
    max_sleep: timedelta = timedelta(hours=1)
    # Retries after a failed renewal: exponential from first to max, with jitter.
    retry_first: timedelta = timedelta(seconds=30)
    retry_max: timedelta = timedelta(hours=1)
    # A renewal request that gets no full answer within this long has failed.
    request_timeout: timedelta = timedelta(seconds=TIMEOUT_S)


class CertificateRenewer:
    def __init__(
        self,
        store: IdentityStore,
        *,
        clock: Callable[[], datetime] = utc_now,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        policy: RenewalPolicy | None = None,
        on_renewed: Iterable[Listener] = (),
    ) -> None:
        self._store = store
        self._clock = clock
        self._sleep = sleep
        self.policy = policy or RenewalPolicy()
        self._listeners: list[Listener] = list(on_renewed)

    def add_listener(self, listener: Listener) -> None:
        """Call `listener(new_credentials)` after each renewal (sync or async callable)."""
        self._listeners.append(listener)

    def due_at(self, credentials: DeviceCredentials) -> datetime:
        return renewal_time(credentials.certificate, self.policy.at_fraction)

    async def renew(self) -> DeviceCredentials:
        """One renewal attempt; IdentityError (CertificateExpired past expiry) if it fails."""
        current = self._require_current()
        enrollment = self._store.enrollment()
        endpoints = enrollment.get("endpoints")
        device_url = endpoints.get("device_url") if isinstance(endpoints, dict) else None
        if not device_url or not isinstance(device_url, str):
            raise IdentityError(f"{self._store.enrollment_file} names no device_url; re-enroll")
        key = new_private_key()
        try:
            reply = await post_json(
                f"{device_url.rstrip('/')}/v1/devices/self/renew",
                {"csr": build_csr(key, current.identity.device_id).decode()},
                ssl_context=current.ssl_context(),
                timeout_s=self.policy.request_timeout.total_seconds(),
            )
        except IdentityError as exc:
            if self._clock() >= current.certificate.not_valid_after_utc:
                raise CertificateExpired(self._expired_message(current, exc)) from exc
            raise
        ca_cert = current.ca_file.read_bytes()
        certificate = check_issued(reply, x509.load_pem_x509_certificate(ca_cert), self._clock())
        # The whole identity, not just the subject: a certificate for the same device id in
        # another region would move this node to that region's models and topics.
        issued, mine = device_identity_of(certificate), current.identity
        if issued != mine:
            raise IdentityError(
                f"renewal returned a certificate for device {issued.device_id!r} in region "
                f"{issued.region!r}, but this is {mine.device_id!r} in {mine.region!r}; "
                "keeping the current certificate"
            )
        expires, replaced = certificate.not_valid_after_utc, current.certificate.not_valid_after_utc
        if expires < replaced:
            raise IdentityError(
                f"renewal returned certificate {serial_hex(certificate)} that expires at "
                f"{expires.isoformat(timespec='seconds')}, before the current one "
                f"({replaced.isoformat(timespec='seconds')}); keeping the current certificate"
            )
        record = enrollment_record(reply, enrollment.get("server_url", ""))
        renewed = self._store.save(key, certificate, ca_cert, record)
        log.info(
            "device certificate renewed",
            extra={"serial": renewed.serial, "not_after": str(certificate.not_valid_after_utc)},
        )
        await self._notify(renewed)
        return renewed

    async def run(self) -> None:
        """Renew forever: sleep until due, renew, retry with backoff on failure.

        Only cancellation ends it. Any other failure (control plane down or stalled, a damaged
        file, a bug) is logged and retried: a renewer that stops lets the certificate expire.
        """
        failures = 0
        while True:
            try:
                current = self._require_current()
                wait = self.due_at(current) - self._clock()
                if wait > timedelta(0):
                    await self._sleep(min(wait, self.policy.max_sleep).total_seconds())
                    continue
                await self.renew()
                failures = 0
            except CertificateExpired as exc:
                failures += 1
                log.error(str(exc))
                await self._sleep(self._backoff(failures))
            except Exception as exc:
                failures += 1
                delay = self._backoff(failures)
                log.warning(
                    "certificate renewal failed; will retry",
                    extra={"error": str(exc) or repr(exc), "retry_in_s": round(delay)},
                    # An IdentityError says what is wrong; anything else needs its traceback.
                    exc_info=not isinstance(exc, IdentityError),
                )
                await self._sleep(delay)

    def _require_current(self) -> DeviceCredentials:
        current = self._store.current()
        if current is None:
            raise IdentityError(
                f"no device certificate in {self._store.directory}; run: edgefleet-agent install"
            )
        return current

    def _backoff(self, failures: int) -> float:
        first = self.policy.retry_first.total_seconds()
        delay = min(first * 2 ** (failures - 1), self.policy.retry_max.total_seconds())
        return delay * random.uniform(0.8, 1.2)

    async def _notify(self, credentials: DeviceCredentials) -> None:
        for listener in self._listeners:
            try:
                result = listener(credentials)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("a certificate listener failed; the new certificate is in place")

    def _expired_message(self, current: DeviceCredentials, cause: Exception) -> str:
        cert = current.certificate
        return (
            f"device certificate {current.serial} expired at "
            f"{cert.not_valid_after_utc.isoformat(timespec='seconds')} and cannot be renewed "
            f"({cause}). To recover, ask an operator for a re-enrollment token "
            f"(edgefleet token create --device {current.identity.device_id}) and run: "
            "edgefleet-agent enroll --token TOKEN. See docs/identity.md."
        )
