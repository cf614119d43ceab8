"""Identity and trust shared by the agent and the control plane.

The control plane runs a device CA (`ca`) that turns a device's certificate signing request
(`csr`) into a short-lived certificate whose identity it chooses (`identity`), and publishes a
CRL for revoked ones (`crl`). Enrollment tokens (`tokens`) let a new device ask once. Keys are
written 0600 from the first byte (`keys`); `tls` builds the SSL contexts both sides use.
"""
