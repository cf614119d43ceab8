"""The device's own identity: its key pair, its certificate, and keeping them valid.

- `store`: the identity directory (key 0600, certificate, CA), switched atomically on renewal.
- `enroll`: first contact: token + CSR over TLS checked against the token's CA pin.
- `renewal`: renews at 2/3 of the certificate's lifetime over mTLS and tells listeners, so
  clients pick up the new certificate without a restart; local serving is never touched.

    store = IdentityStore(state_dir / "identity")
    await enroll("https://cp.example:8443", token, store)
    renewer = CertificateRenewer(store, on_renewed=[sync_client.reconnect])
    asyncio.create_task(renewer.run())
"""

from agent.identity.enroll import enroll
from agent.identity.errors import IdentityError
from agent.identity.renewal import CertificateRenewer, RenewalPolicy
from agent.identity.store import DeviceCredentials, IdentityStore

__all__ = [
    "CertificateRenewer",
    "DeviceCredentials",
    "IdentityError",
    "IdentityStore",
    "RenewalPolicy",
    "enroll",
]
