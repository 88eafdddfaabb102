"""The stream bridge: plant data from MQTT (JSON, Sparkplug B) and OPC UA into the lake, continuously.

Modules, one concept each: :mod:`.config` (the mapping and batching, a pydantic model read from a
file), :mod:`.sparkplug` (Sparkplug B protobuf codec), :mod:`.decode` (payload -> contract rows),
:mod:`.buffer` (bounded buffer: back-pressure), :mod:`.commit` (micro-batch -> quarantine, dedupe,
one Delta commit with an application transaction, then acks), :mod:`.events` (Prefect events),
:mod:`.mqtt` and :mod:`.opcua` (the sources), :mod:`.run` (the loop), :mod:`.simulate` (C-MAPSS
units replayed as live MQTT messages or served as historized OPC UA nodes).
"""
