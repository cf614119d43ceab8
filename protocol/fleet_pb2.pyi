from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class HelloRequest(_message.Message):
    __slots__ = ("agent_version",)
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    agent_version: str
    def __init__(self, agent_version: _Optional[str] = ...) -> None: ...

class HelloReply(_message.Message):
    __slots__ = ("device_id", "region", "server_region", "certificate_serial", "certificate_not_after", "server_time_ms")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    SERVER_REGION_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_SERIAL_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    region: str
    server_region: str
    certificate_serial: str
    certificate_not_after: int
    server_time_ms: int
    def __init__(self, device_id: _Optional[str] = ..., region: _Optional[str] = ..., server_region: _Optional[str] = ..., certificate_serial: _Optional[str] = ..., certificate_not_after: _Optional[int] = ..., server_time_ms: _Optional[int] = ...) -> None: ...

class Beat(_message.Message):
    __slots__ = ("seq",)
    SEQ_FIELD_NUMBER: _ClassVar[int]
    seq: int
    def __init__(self, seq: _Optional[int] = ...) -> None: ...

class BeatAck(_message.Message):
    __slots__ = ("seq", "server_time_ms")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    server_time_ms: int
    def __init__(self, seq: _Optional[int] = ..., server_time_ms: _Optional[int] = ...) -> None: ...
