"""Sparkplug B codec, checked against the protobuf library (a descriptor with Tahu's field numbers)."""

from __future__ import annotations

import math

import pytest

from twinflow.tasks.bridge.decode import DecodeError, decode_sparkplug
from twinflow.tasks.bridge.sparkplug import SparkplugError, decode_payload, encode_payload, parse_topic


def _official_payload_class():
    """``org.eclipse.tahu.protobuf.Payload`` built from sparkplug_b.proto's field numbers and types."""
    pytest.importorskip("google.protobuf")
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="sparkplug_b_test.proto", package="org.eclipse.tahu.protobuf",
                                             syntax="proto2")
    payload = fdp.message_type.add(name="Payload")
    metric = payload.nested_type.add(name="Metric")
    meta = payload.nested_type.add(name="MetaData")  # a message the decoder must skip
    meta.field.add(name="content_type", number=2, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    for name, num, typ in [("name", 1, F.TYPE_STRING), ("alias", 2, F.TYPE_UINT64), ("timestamp", 3, F.TYPE_UINT64),
                           ("datatype", 4, F.TYPE_UINT32), ("is_historical", 5, F.TYPE_BOOL),
                           ("is_transient", 6, F.TYPE_BOOL), ("is_null", 7, F.TYPE_BOOL),
                           ("int_value", 10, F.TYPE_UINT32), ("long_value", 11, F.TYPE_UINT64),
                           ("float_value", 12, F.TYPE_FLOAT), ("double_value", 13, F.TYPE_DOUBLE),
                           ("boolean_value", 14, F.TYPE_BOOL), ("string_value", 15, F.TYPE_STRING)]:
        metric.field.add(name=name, number=num, type=typ, label=F.LABEL_OPTIONAL)
    metric.field.add(name="metadata", number=8, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
                     type_name=".org.eclipse.tahu.protobuf.Payload.MetaData")
    payload.field.add(name="timestamp", number=1, type=F.TYPE_UINT64, label=F.LABEL_OPTIONAL)
    payload.field.add(name="metrics", number=2, type=F.TYPE_MESSAGE, label=F.LABEL_REPEATED,
                      type_name=".org.eclipse.tahu.protobuf.Payload.Metric")
    payload.field.add(name="seq", number=3, type=F.TYPE_UINT64, label=F.LABEL_OPTIONAL)
    payload.field.add(name="uuid", number=4, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("org.eclipse.tahu.protobuf.Payload"))


def test_decodes_payloads_encoded_by_protobuf():
    Payload = _official_payload_class()
    p = Payload(timestamp=1700000000123, seq=7, uuid="ignored")
    m = p.metrics.add(name="cycle", datatype=4, long_value=42, timestamp=1700000000123)
    m.metadata.content_type = "skip me"
    p.metrics.add(name="s2", datatype=10, double_value=642.5)
    p.metrics.add(name="s3", datatype=9, float_value=1589.75)
    p.metrics.add(name="temp", datatype=3, int_value=(-5) & 0xFFFFFFFF)  # Int32 -5 as Tahu sends it
    p.metrics.add(name="on", datatype=11, boolean_value=True)
    p.metrics.add(name="s4", datatype=10, is_null=True)
    p.metrics.add(name="label", datatype=12, string_value="été")
    got = decode_payload(p.SerializeToString())
    assert (got.timestamp, got.seq) == (1700000000123, 7)
    values = {x.name: x.value for x in got.metrics}
    assert values == {"cycle": 42, "s2": 642.5, "s3": 1589.75, "temp": -5, "on": True, "s4": None, "label": "été"}


def test_our_encoder_is_read_by_protobuf():
    Payload = _official_payload_class()
    data = encode_payload({"cycle": 3, "s2": 641.82, "s4": None, "ok": True}, timestamp=123, seq=9)
    p = Payload()
    p.ParseFromString(data)
    assert (p.timestamp, p.seq) == (123, 9)
    by = {m.name: m for m in p.metrics}
    assert by["cycle"].long_value == 3 and math.isclose(by["s2"].double_value, 641.82)
    assert by["s4"].is_null and by["ok"].boolean_value


def test_row_from_ddata_and_bad_payloads():
    topic = "spBv1.0/plant/DDATA/gw1/unit-7"
    rows = decode_sparkplug(topic, encode_payload({"cycle": 5, "s2": 642.0, "op_setting_1": 0.001}))
    assert rows == [{"cycle": 5, "s2": 642.0, "op_setting_1": 0.001, "asset_id": "unit-7"}]
    assert decode_sparkplug("spBv1.0/plant/NBIRTH/gw1", encode_payload({"bdSeq": 0})) == []
    with pytest.raises(DecodeError, match="invalid Sparkplug B payload"):
        decode_sparkplug(topic, b"\x12\xff\x01garbage")
    with pytest.raises(DecodeError, match="missing cycle"):
        decode_sparkplug(topic, encode_payload({"s2": 1.0}))
    with pytest.raises(DecodeError, match="not a Sparkplug B topic"):
        decode_sparkplug("plant/unit-7", encode_payload({"cycle": 1}))
    with pytest.raises(SparkplugError):
        decode_payload(b"\x08")  # truncated varint
    assert parse_topic("spBv1.0/g/NDATA/edge") == ("g", "NDATA", "edge", None)
