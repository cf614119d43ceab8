"""`edgefleet model ...`: sign, verify and publish model packages; manage publishers.

edgefleet model sign DIR --key publisher.key        writes DIR/model.sig
edgefleet model verify DIR --pubkey publisher.pub
edgefleet model push DIR                            checks the publisher, adds TUF targets
edgefleet model list
edgefleet model publisher add NAME --pubkey P --models cnn,detector-* --root-keys OFFLINE
edgefleet model publisher remove NAME --root-keys OFFLINE
edgefleet model publisher list
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from controlplane.cli import UserError
from controlplane.commands._common import (
    add_config_argument,
    open_tuf_repository,
    record_audit,
)

PASSWORD_ENV = "EDGEFLEET_KEY_PASSWORD"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("model", help="sign, verify and publish model packages")
    sub = parser.add_subparsers(dest="model_command", metavar="ACTION", required=True)

    sign = sub.add_parser(
        "sign",
        help="sign a package directory (OpenSSF model signing, elliptic-key mode)",
        description="Validate DIR/edgefleet.toml and the files it names, then sign every file "
        "of DIR into DIR/model.sig with the publisher's EC private key (PEM). The result is "
        "the same as `model_signing sign key DIR --signature DIR/model.sig --private_key K`. "
        f"An encrypted key's password comes from ${PASSWORD_ENV}.",
    )
    sign.add_argument("dir", type=Path, metavar="DIR")
    sign.add_argument("--key", type=Path, required=True, metavar="K", help="private key (PEM)")
    sign.set_defaults(func=run_sign)

    verify = sub.add_parser(
        "verify",
        help="check a package's signature and manifest against a publisher's public key",
    )
    verify.add_argument("dir", type=Path, metavar="DIR")
    verify.add_argument("--pubkey", type=Path, required=True, metavar="P", help="public key")
    verify.set_defaults(func=run_verify)

    push = sub.add_parser(
        "push",
        help="publish a signed package: one TUF target per variant",
        description="Check that a registered publisher allowed to sign this model signed the "
        "package, then store each variant content-addressed and add it to the TUF repository "
        "as <model>/<version>/<variant>.tar.",
    )
    push.add_argument("dir", type=Path, metavar="DIR")
    add_config_argument(push)
    push.set_defaults(func=run_push)

    listing = sub.add_parser("list", help="list published model variants")
    add_config_argument(listing)
    listing.set_defaults(func=run_list)

    publisher = sub.add_parser("publisher", help="register who may sign which models")
    actions = publisher.add_subparsers(dest="publisher_command", metavar="ACTION", required=True)
    add = actions.add_parser(
        "add",
        help="register a publisher key for some models (needs the offline root keys)",
        description="Register (or change the models of) a publisher. The publisher list is "
        "signed by the TUF root keys, so this needs the offline root key directory: the online "
        "control plane alone cannot let a new key publish models.",
    )
    add.add_argument("name")
    add.add_argument("--pubkey", type=Path, required=True, help="the publisher's public key")
    add.add_argument(
        "--models", required=True, help="comma-separated model names or patterns (vision-*)"
    )
    add.add_argument("--root-keys", type=Path, required=True, metavar="DIR")
    add_config_argument(add)
    add.set_defaults(func=run_publisher_add)
    remove = actions.add_parser("remove", help="revoke a publisher (needs the root keys)")
    remove.add_argument("name")
    remove.add_argument("--root-keys", type=Path, required=True, metavar="DIR")
    add_config_argument(remove)
    remove.set_defaults(func=run_publisher_remove)
    show = actions.add_parser("list", help="list registered publishers")
    add_config_argument(show)
    show.set_defaults(func=run_publisher_list)


def run_sign(args: argparse.Namespace) -> int:
    from provisioning.package import Package
    from provisioning.signing import SignatureError, sign_package

    try:
        package = Package.load(args.dir)
        sign_package(args.dir, args.key, os.environ.get(PASSWORD_ENV))
    except (ValueError, SignatureError) as exc:
        raise UserError(str(exc)) from None
    manifest = package.manifest
    print(
        f"signed {manifest.name}@{manifest.version} ({len(manifest.variants)} variant(s)) "
        f"into {args.dir / 'model.sig'}"
    )
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from provisioning.package import Package
    from provisioning.signing import key_id, load_public_key, verify_package

    try:
        key = load_public_key(args.pubkey)
        package = Package.load(args.dir)
        signed = verify_package(args.dir, key, required=package.manifest.all_files(), strict=False)
    except ValueError as exc:
        raise UserError(f"verification failed: {exc}") from None
    manifest = package.manifest
    print(
        f"OK: {manifest.name}@{manifest.version}, {len(signed.files)} files signed by key "
        f"{key_id(key)[:16]}"
    )
    return 0


def run_push(args: argparse.Namespace) -> int:
    from controlplane.model_store import ModelStore, PushRefused

    store = ModelStore(open_tuf_repository(args))
    try:
        published = store.push(args.dir)
    except PushRefused as exc:
        raise UserError(str(exc)) from None
    publishers = sorted({str(v.custom.get("publisher", "")) for v in published})
    record_audit(
        args,
        "model.push",
        detail=f"targets {[v.target for v in published]}, publisher key {publishers}",
    )
    for variant in published:
        print(f"published {variant.target}  {variant.length} B  sha256:{variant.sha256[:16]}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    targets = open_tuf_repository(args).targets().signed.targets
    print(f"{'TARGET':<40} {'RUNTIME':<12} {'PRECISION':<9} {'BYTES':>12}  PUBLISHER")
    for path, info in sorted(targets.items()):
        custom = info.custom if isinstance(info.custom, dict) else {}
        if "model" not in custom:
            continue
        print(
            f"{path:<40} {custom.get('runtime', ''):<12} {custom.get('precision', ''):<9} "
            f"{info.length:>12}  {str(custom.get('publisher', ''))[:16]}"
        )
    return 0


def run_publisher_add(args: argparse.Namespace) -> int:
    from controlplane.publishers import PublisherRegistry
    from controlplane.tuf_repository import TufRepositoryError
    from provisioning.signing import SignatureError, load_public_key

    repository = open_tuf_repository(args)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        key = load_public_key(args.pubkey)
        publisher = PublisherRegistry(repository).register(
            args.name, key, models, repository.root_signers(args.root_keys)
        )
    except (SignatureError, TufRepositoryError) as exc:
        raise UserError(str(exc)) from None
    record_audit(
        args,
        "publisher.add",
        detail=f"publisher {publisher.name}, key {publisher.key_id}, models {list(models)}",
    )
    print(
        f"publisher {publisher.name} (key {publisher.key_id[:16]}) may sign: "
        f"{', '.join(publisher.models)}. Move {args.root_keys} back offline."
    )
    return 0


def run_publisher_remove(args: argparse.Namespace) -> int:
    from controlplane.publishers import PublisherRegistry
    from controlplane.tuf_repository import TufRepositoryError

    repository = open_tuf_repository(args)
    try:
        PublisherRegistry(repository).remove(args.name, repository.root_signers(args.root_keys))
    except TufRepositoryError as exc:
        raise UserError(str(exc)) from None
    record_audit(args, "publisher.remove", detail=f"publisher {args.name}")
    print(f"publisher {args.name} removed; nodes refuse its signatures from their next update")
    return 0


def run_publisher_list(args: argparse.Namespace) -> int:
    from controlplane.publishers import PublisherRegistry

    listing = PublisherRegistry(open_tuf_repository(args)).current()
    print(f"publisher list version {listing.version}, expires {listing.expires:%Y-%m-%d}")
    for p in listing.publishers:
        print(f"  {p.name:<20} key {p.key_id[:16]}  models: {', '.join(p.models)}")
    return 0
