"""Mutated enrollment requests against a real control plane over HTTPS: seeded variations of a
valid {"token", "csr"} body (JSON nodes replaced or deleted, the token's and the CSR's bytes
flipped, cut or extended). Each is a 201 or a refusal that names the problem, never a server
error; a refusal never spends the token; and a good request still enrolls afterwards.
"""

from __future__ import annotations

import json
import random
import ssl

import aiohttp
import pytest

from provisioning.csr import build_csr
from provisioning.keys import new_private_key
from tests import mutations
from tests.mutations import mutate_bytes

REFUSALS = {400, 403, 413}  # bad request, token rejected, body too large
KEYS = ["token", "csr", "device_id", "region", "tags"]


def mutate_pem(pem: str, rng: random.Random) -> str:
    """The CSR with its base64 body (or, sometimes, its armour) damaged."""
    lines = pem.splitlines(keepends=True)
    if rng.random() < 0.8 and len(lines) > 2:
        i = rng.randrange(1, len(lines) - 1)
        lines[i] = mutate_bytes(lines[i].encode(), rng).decode("latin-1")
        return "".join(lines)
    return mutate_bytes(pem.encode(), rng).decode("latin-1")


@pytest.mark.parametrize("seed", range(3))
async def test_mutated_enrollment_requests(control_plane, seed):
    env = control_plane
    rng = random.Random(seed)
    uses = 500
    token = env.token(uses=uses)
    token_id = token.split(".")[1]
    csr = build_csr(new_private_key()).decode()
    context = ssl.create_default_context(cafile=str(env.config.ca_dir / "ca.pem"))
    enrolled = 0
    async with aiohttp.ClientSession() as session:

        async def post(body: bytes) -> tuple[int, dict]:
            async with session.post(
                f"{env.endpoints.enroll_url}/v1/enroll",
                data=body,
                headers={"Content-Type": "application/json"},
                ssl=context,
            ) as response:
                return response.status, await response.json(content_type=None)

        for n in range(120):
            doc = {"token": token, "csr": csr}
            choice = rng.random()
            if choice < 0.4:
                doc = mutations.mutate_json(doc, rng, keys=KEYS)
            elif choice < 0.6:
                raw = mutate_bytes(token.encode(), rng)
                doc["token"] = raw.decode("latin-1")
            else:
                doc["csr"] = mutate_pem(csr, rng)
            body = json.dumps(doc).encode()
            if rng.random() < 0.1:
                body = mutate_bytes(body, rng)
            status, reply = await post(body)
            what = f"seed {seed} request {n}: {body[:300]!r}"
            if status == 201:
                enrolled += 1
                assert reply["device_id"].startswith("dev-"), what
                continue
            assert status in REFUSALS, f"{what}: {status} {reply}"
            assert reply.get("message") and reply.get("error"), f"{what}: {reply}"

        # nested too deep for a JSON parser that recurses
        status, reply = await post(b"[" * 30_000 + b"]" * 30_000)
        assert status == 400 and reply["message"], reply

        assert env.plane.tokens.get(token_id).uses_left == uses - enrolled
        status, reply = await post(json.dumps({"token": token, "csr": csr}).encode())
        assert status == 201, reply
