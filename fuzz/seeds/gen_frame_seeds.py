#!/usr/bin/env python3
"""Writes fuzz/seeds/frame_decode/: one CBOR frame body per request and
response variant of shared/src/protocol.rs, as serde_cbor encodes them
(structs as maps with text keys, unit variants as text, other variants as a
one-key map, byte fields as byte strings), plus audit records in the
canonical form of shared/src/audit/record.rs inside an AuditRecords answer.

Run from anywhere: python3 fuzz/seeds/gen_frame_seeds.py
Standard library only (a few lines of CBOR encoding, no cbor2)."""

import os
import struct

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "frame_decode")


def head(major, n):
    if n < 24:
        return bytes([major << 5 | n])
    for info, fmt in ((24, ">B"), (25, ">H"), (26, ">I"), (27, ">Q")):
        if n < 1 << (8 * struct.calcsize(fmt)):
            return bytes([major << 5 | info]) + struct.pack(fmt, n)
    raise ValueError(n)


def cbor(v):
    if v is None:
        return b"\xf6"
    if v is True:
        return b"\xf5"
    if v is False:
        return b"\xf4"
    if isinstance(v, int):
        return head(0, v) if v >= 0 else head(1, -1 - v)
    if isinstance(v, bytes):
        return head(2, len(v)) + v
    if isinstance(v, str):
        b = v.encode()
        return head(3, len(b)) + b
    if isinstance(v, list):
        return head(4, len(v)) + b"".join(cbor(x) for x in v)
    if isinstance(v, dict):
        return head(5, len(v)) + b"".join(cbor(k) + cbor(x) for k, x in v.items())
    raise TypeError(v)


def u16(n):
    return struct.pack(">H", n)


def text(s):
    return u16(len(s)) + s.encode()


CALLER = {
    "uid": 1000,
    "user": "api",
    "gid": 1000,
    "groups": [1000, 27],
    "group_names": ["api", "sudo"],
    "unit": "api.service",
    "token": "ci",
}

# Canonical audit records: format 1, seq, time, event.
START = b"\x01" + struct.pack(">QQ", 0, 1_700_000_000_000) + b"\x00" + bytes(range(16))
REQUEST = (
    b"\x01" + struct.pack(">QQ", 1, 1_700_000_000_001)
    + b"\x01" + b"\x00"  # Request, op Get
    + u16(1) + text("DB_PASSWORD")
    + b"\x00"  # no count
    + b"\x01"  # caller
    + b"\x01" + struct.pack(">I", 1000) + b"\x01" + text("api")
    + b"\x01" + struct.pack(">I", 1000)
    + u16(1) + struct.pack(">I", 1000) + u16(1) + text("api")
    + b"\x01" + text("api.service") + b"\x00"
    + text("unix:agent") + b"\x03" + text("NotFound")
)
GAP = b"\x01" + struct.pack(">QQ", 2, 1_700_000_000_002) + b"\x02" + struct.pack(">QQ", 2, 5) + bytes(32)
CHECKPOINT = b"\x01" + struct.pack(">QQ", 3, 1_700_000_000_003) + b"\x03" + struct.pack(">I", 4) + b"\xd2\x84\x40\xa0"


def request(id, op, caller=None):
    msg = {"id": id, "v": 1, "op": op}
    if caller is not None:
        msg["caller"] = caller
    return msg


def response(id, result):
    return {"id": id, "v": 1, "result": result}


SEEDS = {
    "req-get": request(1, {"Get": {"name": "DB_PASSWORD"}}),
    "req-get-caller": request(2, {"Get": {"name": "db/password"}}, CALLER),
    "req-list": request(3, "List", {"uid": 0}),
    "req-status": request(4, "Status"),
    "req-attest": request(5, {"Attest": {"nonce": b"0123456789abcdef", "user_data": b"ud"}}),
    "req-attest-nouser": request(6, {"Attest": {"nonce": b"n", "user_data": None}}),
    "req-load": request(7, {"Load": {"entries": [
        {"name": "A", "envelope": "ENC[v1:kms:QUJD]"},
        {"name": "keystore:rules", "envelope": "ENC[v1:kms:AQID]"},
    ]}}),
    "req-get-credentials": request(8, "GetCredentials"),
    "req-audit-read": request(9, {"AuditRead": {"after": {"seq": 41, "hash": bytes(32)}, "max": 128}}),
    "req-audit-read-first": request(10, {"AuditRead": {"max": 1024}}),
    "req-audit-checkpoint": request(11, "AuditCheckpoint"),
    "req-header-only": {"id": 12, "v": 2},
    "req-log-read": request(13, {"LogRead": {"after": {"run": 7, "seq": 41}, "max": 512}}),
    "req-log-read-first": request(14, {"LogRead": {"max": 64}}),
    "resp-secret": response(1, {"Secret": {"name": "DB_PASSWORD", "value": b"hunter2"}}),
    "resp-names": response(3, {"Names": {"names": ["A", "db/password"]}}),
    "resp-status": response(4, {"Status": {
        "ready": True, "secret_count": 2, "document_age_ms": 5, "uptime_ms": 9,
        "version": "0.1.0", "recipient_key_bits": 2048, "refresh_count": 1,
        "last_error": None, "secret_peers": "privileged", "last_decrypt_age_ms": 7,
        "audit": {"last_seq": 3, "buffered": 1, "dropped": 0, "gaps": 0, "dropping": False},
        "last_good_load_unix_ms": 1_700_000_000_000, "max_stale_ms": 60_000,
        "breaker": {"state": "closed", "consecutive_failures": 0, "next_probe_in_ms": None, "opened": 0,
                    "last_failure": "KMS refused: ThrottlingException (HTTP 400)"},
        "kms_pins": {"region": "us-east-1", "key_arns": [
            "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        ]},
        "kms": {"calls": [
            {"operation": "Decrypt", "outcome": "ok", "count": 3},
            {"operation": "Decrypt", "outcome": "ThrottlingException", "count": 1},
        ]},
        "logs": {"buffered": 2, "dropped": 0, "last_seq": 9},
    }}),
    "resp-attestation": response(5, {"Attestation": {"document": b"\xd2\x84\x44\xa1\x01\x38\x22\xa0"}}),
    "resp-loaded": response(7, {"Loaded": {"count": 2}}),
    "resp-credentials": response(8, {"Credentials": {
        "access_key_id": "AKIAEXAMPLE", "secret_access_key": "secret", "session_token": "token",
    }}),
    "resp-audit-records": response(9, {"AuditRecords": {"entries": [
        {"record": START, "hash": bytes(32)},
        {"record": REQUEST, "hash": b"\x01" * 32},
        {"record": GAP, "hash": b"\x02" * 32},
        {"record": CHECKPOINT, "hash": b"\x03" * 32},
    ], "more": True}}),
    "resp-audit-checkpointed": response(11, {"AuditCheckpointed": {"seq": 3}}),
    "resp-log-records": response(13, {"LogRecords": {"run": 7, "entries": [
        {"seq": 42, "unix_ms": 1_700_000_000_000, "level": "Info", "target": "keystore_enclave::load",
         "message": "loaded", "fields": [{"name": "count", "value": "3"}]},
        {"seq": 43, "unix_ms": 1_700_000_000_001, "level": "Warn", "target": "keystore_enclave::kms",
         "message": "Decrypt failed", "fields": []},
    ], "more": False, "dropped": 1}}),
    "resp-error": response(0, {"Error": {"code": "Denied", "message": "not allowed"}}),
}


def main():
    os.makedirs(OUT, exist_ok=True)
    for name, msg in SEEDS.items():
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(cbor(msg))


if __name__ == "__main__":
    main()
