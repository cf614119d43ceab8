"""The device identity facing a world that misbehaves: a control plane that stalls or sends too
much, damaged files on the node, settings that would inject lines into the config.

Everything is made here: a CA, an enrolled identity, and servers on 127.0.0.1 port 0 that
answer the way a broken or hostile control plane (or whoever sits in between) would.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import re
import socket
import ssl
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent import cli as agent_cli
from agent.config import load_config
from agent.identity import CertificateRenewer, IdentityError, IdentityStore, RenewalPolicy, enroll
from agent.identity.client import MAX_CA_BYTES, MAX_REPLY_BYTES, get_bytes, post_json
from agent.install import InstallError, InstallPlan, Layout, install, toml_string
from provisioning.ca import CertificateAuthority, utc_now
from provisioning.identity import DeviceIdentity
from provisioning.keys import new_private_key, private_key_pem
from provisioning.tls import server_context
from provisioning.tokens import ca_pin, new_token

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def new_ca(directory: Path) -> tuple[CertificateAuthority, ssl.SSLContext]:
    """A device CA, and a TLS server context for 127.0.0.1 that requires its client certs."""
    ca = CertificateAuthority.create(directory / "ca")
    key = new_private_key()
    cert = ca.issue_server(key.public_key(), "eu", ["127.0.0.1"])
    (directory / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "server.key").write_bytes(private_key_pem(key))
    context = server_context(
        directory / "server.pem", directory / "server.key", directory / "ca" / "ca.pem"
    )
    return ca, context


def enrolled_store(directory: Path, ca: CertificateAuthority, device_url: str) -> IdentityStore:
    store = IdentityStore(directory)
    key = new_private_key()
    cert = ca.issue_device(key.public_key(), DeviceIdentity("dev-1", "eu"))
    record = {"device_id": "dev-1", "region": "eu", "server_url": device_url}
    store.save(key, cert, ca.certificate_pem, {**record, "endpoints": {"device_url": device_url}})
    return store


@contextlib.asynccontextmanager
async def silent_server(context: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    """A server that takes the connection and the request and never answers: its port."""

    connections: dict[asyncio.Task, asyncio.StreamWriter] = {}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections[asyncio.current_task()] = writer
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await reader.read()  # until the client gives up, or the test ends
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in connections.values():
            writer.close()  # ends the read: each handler returns rather than being cancelled
        await asyncio.gather(*connections)


@contextlib.asynccontextmanager
async def web_server(
    routes: list[web.RouteDef], context: ssl.SSLContext | None = None
) -> AsyncIterator[int]:
    app = web.Application()
    app.add_routes(routes)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.create_server(("127.0.0.1", 0))
    await web.SockSite(runner, sock, ssl_context=context).start()
    try:
        yield sock.getsockname()[1]
    finally:
        await runner.cleanup()


async def oversized(request: web.Request, size: int, *, announced: bool) -> web.StreamResponse:
    """A JSON object of `size` bytes, with a Content-Length or streamed without one."""
    body = b'{"pad": "' + b"A" * (size - 12) + b'"}'
    if announced:
        return web.Response(body=body, content_type="application/json")
    response = web.StreamResponse()
    response.content_type = "application/json"
    await response.prepare(request)
    with contextlib.suppress(ConnectionError):
        for start in range(0, size, 64 * 1024):
            await response.write(body[start : start + 64 * 1024])
    return response


# --- a control plane that stalls: renewal goes on --------------------------------------------


@pytest.mark.parametrize("call", ["get_bytes", "post_json"])
async def test_a_control_plane_that_never_answers_is_an_identity_error(call):
    async with silent_server() as port:
        url = f"http://127.0.0.1:{port}/v1/anything"
        with pytest.raises(IdentityError, match=re.escape(f"no answer from {url} within 0.2 s")):
            if call == "get_bytes":
                await get_bytes(url, ssl_context=False, timeout_s=0.2)
            else:
                await post_json(url, {}, ssl_context=None, timeout_s=0.2)


DAMAGED_ENROLLMENTS = {
    "not JSON": lambda path: path.write_text('{"endpoints": {"device_url": "https://127.0.0.1:1'),
    "not UTF-8": lambda path: path.write_bytes(b'{"region": "\xff"}'),
    "not an object": lambda path: path.write_text('["https://127.0.0.1:1"]'),
    "a directory": lambda path: (path.unlink(), path.mkdir()),
}


@pytest.mark.parametrize("damage", DAMAGED_ENROLLMENTS)
def test_a_damaged_enrollment_record_is_an_identity_error(tmp_path, damage):
    ca, _ = new_ca(tmp_path)
    store = enrolled_store(tmp_path / "identity", ca, "https://127.0.0.1:1")
    DAMAGED_ENROLLMENTS[damage](store.enrollment_file)
    with pytest.raises(
        IdentityError, match=r"enrollment\.json is damaged .*edgefleet-agent enroll"
    ):
        store.enrollment()


class RetryTime:
    """The device's clock, at the time renewal is due, and its sleep, which records each wait
    and cancels the renewer at the third: cancellation is the one way out of `run()`."""

    def __init__(self, store: IdentityStore) -> None:
        self.due = CertificateRenewer(store).due_at(store.current())
        self.slept: list[float] = []

    def now(self):
        return self.due

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        if len(self.slept) == 3:
            raise asyncio.CancelledError
        await asyncio.sleep(0)


@pytest.mark.parametrize(
    "trouble",
    ["control plane stalls", *DAMAGED_ENROLLMENTS, "endpoints not an object", "unforeseen"],
)
async def test_renewal_retries_whatever_goes_wrong(tmp_path, caplog, trouble):
    ca, context = new_ca(tmp_path)
    policy = RenewalPolicy(request_timeout=timedelta(seconds=0.5))
    async with silent_server(context) as port:
        store = enrolled_store(tmp_path / "identity", ca, f"https://127.0.0.1:{port}")
        time = RetryTime(store)
        renewer = CertificateRenewer(store, clock=time.now, sleep=time.sleep, policy=policy)
        if trouble in DAMAGED_ENROLLMENTS:
            DAMAGED_ENROLLMENTS[trouble](store.enrollment_file)
        elif trouble == "endpoints not an object":
            store.enrollment_file.write_text(json.dumps({"endpoints": "https://127.0.0.1:1"}))
        elif trouble == "unforeseen":

            async def bug() -> None:
                raise RuntimeError("a bug in renewal")

            renewer.renew = bug
        with (
            caplog.at_level(logging.WARNING, logger="agent.identity.renewal"),
            pytest.raises(asyncio.CancelledError),
        ):
            await renewer.run()

    # Each attempt failed, was logged with its error and retried after a backoff.
    assert all(seconds >= 0.8 * policy.retry_first.total_seconds() for seconds in time.slept)
    failures = [
        r for r in caplog.records if r.getMessage().startswith("certificate renewal failed")
    ]
    assert len(failures) == len(time.slept) == 3
    assert all(record.error for record in failures)
    if trouble == "control plane stalls":
        assert "no answer from" in failures[0].error


# --- a renewal reply with a certificate the device must not install ------------------------


# (identity, shift of the issuing time, lifetime, why it is refused; None: it is installed)
RENEWAL_REPLIES = {
    "expired": (DeviceIdentity("dev-1", "eu"), timedelta(days=-60), None, "expired at"),
    "not yet valid": (DeviceIdentity("dev-1", "eu"), timedelta(days=60), None, "not valid before"),
    "expires before the current one": (
        DeviceIdentity("dev-1", "eu"),
        timedelta(0),
        timedelta(days=1),
        "before the current one",
    ),
    "another region": (
        DeviceIdentity("dev-1", "zz"),
        timedelta(0),
        None,
        "in region 'zz', but this is 'dev-1' in 'eu'",
    ),
    "another device": (DeviceIdentity("dev-2", "eu"), timedelta(0), None, "device 'dev-2'"),
    "usable": (DeviceIdentity("dev-1", "eu"), timedelta(0), None, None),
}


@pytest.mark.parametrize("case", RENEWAL_REPLIES)
async def test_renewal_keeps_the_current_certificate_unless_the_new_one_is_usable(tmp_path, case):
    """Signed by our CA for the CSR's key, and still not to be installed: a certificate this
    device could not authenticate with (so could never renew again), or one for another
    identity. The current generation stays, and still authenticates."""
    ca, context = new_ca(tmp_path)
    identity, shift, lifetime, refused = RENEWAL_REPLIES[case]

    async def renew(request: web.Request) -> web.Response:
        csr = x509.load_pem_x509_csr((await request.json())["csr"].encode())
        cert = ca.issue_device(csr.public_key(), identity, now=utc_now() + shift, lifetime=lifetime)
        return web.json_response(
            {
                "certificate": cert.public_bytes(serialization.Encoding.PEM).decode(),
                "device_id": "dev-1",
                "region": "eu",
                "endpoints": {"device_url": str(request.url.origin())},
            }
        )

    async with web_server([web.post("/v1/devices/self/renew", renew)], context) as port:
        store = enrolled_store(tmp_path / "identity", ca, f"https://127.0.0.1:{port}")
        before = store.current()
        if refused is None:
            renewed = await CertificateRenewer(store).renew()
            assert store.current().serial == renewed.serial != before.serial
            return
        with pytest.raises(IdentityError, match=re.escape(refused)):
            await CertificateRenewer(store).renew()
    current = store.current()
    assert current.serial == before.serial and current.identity == DeviceIdentity("dev-1", "eu")
    assert (
        current.certificate.not_valid_before_utc
        <= utc_now()
        < current.certificate.not_valid_after_utc
    )


# --- a reply too large to be a control plane's ----------------------------------------------


@pytest.mark.parametrize("announced", [True, False], ids=["content-length", "chunked"])
async def test_enroll_refuses_a_ca_reply_larger_than_a_certificate(tmp_path, announced):
    """The CA is fetched before anything about the server is verified: whoever answers must
    not be able to make the device buffer what it likes."""
    ca, _ = new_ca(tmp_path)
    any_tls = server_context(tmp_path / "server.pem", tmp_path / "server.key")

    async def ca_pem(request: web.Request) -> web.StreamResponse:
        return await oversized(request, 4 * 1024 * 1024, announced=announced)

    store = IdentityStore(tmp_path / "identity")
    async with web_server([web.get("/v1/ca.pem", ca_pem)], any_tls) as port:
        with pytest.raises(IdentityError, match=f"over {MAX_CA_BYTES} bytes"):
            await enroll(f"https://127.0.0.1:{port}", str(new_token(ca_pin(ca.certificate))), store)
    assert store.current() is None


@pytest.mark.parametrize("announced", [True, False], ids=["content-length", "chunked"])
async def test_a_json_reply_past_the_limit_is_refused(announced):
    async def answer(request: web.Request) -> web.StreamResponse:
        return await oversized(request, 2 * MAX_REPLY_BYTES, announced=announced)

    async with web_server([web.post("/v1/enroll", answer)]) as port:
        url = f"http://127.0.0.1:{port}/v1/enroll"
        with pytest.raises(IdentityError, match=f"over {MAX_REPLY_BYTES} bytes"):
            await post_json(url, {"token": "t"}, ssl_context=None)


# --- damaged settings on the node ------------------------------------------------------------


def agent(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = agent_cli.main(list(argv))
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (b'state_dir = "/var/lib/\xff"\n', "cannot read"),
        (b'control_plane = "https://cp:8443"\n', "[control_plane] must be a table"),
        (b'state_dir = 5\n[control_plane]\nurl = "https://127.0.0.1:1"\n', "state_dir must be"),
        (b'state_dir = "rel/dir"\n[control_plane]\nurl = "https://127.0.0.1:1"\n', "absolute"),
        (b'state_dir = "/x"\n[control_plane]\nurl = ["https://127.0.0.1:1"]\n', "url ="),
    ],
    ids=["not-utf8", "control-plane-string", "state-dir-int", "state-dir-relative", "url-list"],
)
def test_enroll_with_a_damaged_installed_config_says_what_is_wrong(tmp_path, config, message):
    (tmp_path / "etc/edgefleet").mkdir(parents=True)
    (tmp_path / "etc/edgefleet/agent.toml").write_bytes(config)
    rc, _, err = agent("enroll", "--token", "T", "--root", str(tmp_path))
    assert rc == 1
    assert err.startswith("edgefleet-agent: error: ") and err.count("\n") == 1
    assert "agent.toml" in err and message in err


def test_enroll_needs_an_absolute_state_dir(tmp_path):
    argv = ("enroll", "--token", "T", "--server", "https://127.0.0.1:1", "--state-dir", "rel")
    rc, _, err = agent(*argv, "--root", str(tmp_path))
    assert rc == 1 and "--state-dir must be an absolute path" in err


# --- the config install writes says exactly what it was given -------------------------------

INJECTION = '"\n[serving]\nhttp = "0.0.0.0:8000'


def enrolled_layout(tmp_path: Path, state_dir: str) -> Layout:
    """A layout below tmp_path whose node is enrolled already: install needs no network."""
    layout = Layout(root=tmp_path / "root", state_dir=Path(state_dir))
    ca, _ = new_ca(tmp_path)
    enrolled_store(layout.on_disk(layout.identity_dir), ca, "https://127.0.0.1:1")
    return layout


@pytest.mark.parametrize("state_dir", ["/var/lib/edgefleet", "/v/ü☃-[x]=y#z"])
def test_install_writes_a_config_the_agent_reads_back_as_given(tmp_path, state_dir):
    layout = enrolled_layout(tmp_path, state_dir)
    install(InstallPlan("https://127.0.0.1:1", "t", layout=layout, start=False))
    config = load_config(layout.on_disk(layout.config_path), env={})
    assert str(config.state_dir) == state_dir
    assert config.control_plane_url == "https://127.0.0.1:1"
    assert config.http == "127.0.0.1:8000"


@pytest.mark.parametrize("suffix", [INJECTION, " two", "\ttab", '"q"', "'q'", "back\\slash", "%h"])
def test_install_refuses_a_state_dir_a_unit_or_config_would_read_otherwise(tmp_path, suffix):
    layout = Layout(root=tmp_path / "root", state_dir=Path("/var/lib/x" + suffix))
    with pytest.raises(InstallError, match="which a systemd unit would read otherwise"):
        install(InstallPlan("https://127.0.0.1:1", "t", layout=layout, start=False))
    assert not (tmp_path / "root").exists()


@pytest.mark.parametrize("url", ["https://127.0.0.1:1" + INJECTION, "https://127.0.0.1:1 x"])
@pytest.mark.parametrize("where", ["--server", "enrollment.json"])
def test_install_refuses_a_server_url_that_would_inject_settings(tmp_path, url, where):
    if where == "--server":
        layout = Layout(root=tmp_path / "root")
    else:
        layout = enrolled_layout(tmp_path, "/var/lib/edgefleet")
        store = IdentityStore(layout.on_disk(layout.identity_dir))
        store.enrollment_file.write_text(json.dumps({**store.enrollment(), "server_url": url}))
    with pytest.raises(IdentityError, match="must not contain spaces or control characters"):
        install(InstallPlan(url, "t", layout=layout, start=False))
    assert not layout.on_disk(layout.config_path).exists()


def test_toml_string_round_trips_any_text():
    text = "".join(map(chr, range(0x80))) + "é ☃ 😀 \u2028"
    assert tomllib.loads(f"v = {toml_string(text)}")["v"] == text
