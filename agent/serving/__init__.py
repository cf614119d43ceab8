"""Local model serving: one data plane, two front ends (KServe v2 REST and gRPC).

    repository.py  finds `<root>/<model>/<version>/model.*` and its optional model.toml
    model.py       a loaded model version: metadata, input validation, its scheduler
    scheduler.py   per-model worker threads, dynamic batching, bounded queue, timeouts
    dataplane.py   the operations both front ends call (health, metadata, infer, repository)
    rest.py        REST front end;     rest_codec.py  JSON + binary tensor extension
    http1.py       HTTP/1.1 connections for it, on llhttp (httptools)
    grpc_server.py gRPC front end;     grpc_codec.py  protobuf <-> tensors
    http2.py       HTTP/2 connections for it (RFC 9113)
    http2_headers.py  their header blocks: HPACK (hpack, cached per connection), request rules
    server.py      runs the front ends over one data plane (TCP, unix socket, signals)

Front ends only translate wire formats; the core works on numpy arrays and dataclasses.
"""
