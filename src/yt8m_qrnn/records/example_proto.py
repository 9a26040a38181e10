"""tf.train.Example and its kin, built with the protobuf runtime alone.

The data path (index, fastparse, reader, synth) only needs the Example,
SequenceExample and Feature messages, but TensorFlow's generated classes come
with `import tensorflow`: slow, and not installed on every machine that runs the
data stages. So the messages are built here at import from their schema, that of
tensorflow/core/example/feature.proto and example.proto (proto3, package
`tensorflow`, the same names, field numbers, types and options): they read and
write the same bytes as TensorFlow's.

They live in a private descriptor pool: TensorFlow, when also imported, adds
its own descriptors under the same full names to the default pool.
"""
from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto
NAMES = ("BytesList", "FloatList", "Int64List", "Feature", "Features", "FeatureList", "FeatureLists", "Example",
         "SequenceExample")


def _field(name, number, kind, repeated=False, oneof=None, **options) -> dict:
    """A field; kind: a FieldDescriptorProto type name (BYTES, FLOAT, INT64, STRING) or a message name."""
    field = dict(name=name, number=number, label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL)
    if hasattr(_F, f"TYPE_{kind}"):
        field["type"] = getattr(_F, f"TYPE_{kind}")
    else:
        field.update(type=_F.TYPE_MESSAGE, type_name=f".tensorflow.{kind}")
    if options:
        field["options"] = descriptor_pb2.FieldOptions(**options)
    if oneof is not None:
        field["oneof_index"] = oneof
    return field


def _message(messages, name, *fields, oneofs=()):
    """Add message `name` with `fields` (from _field) to `messages`."""
    messages.add(name=name, field=fields, oneof_decl=[{"name": oneof} for oneof in oneofs])


def _map(messages, name, field, value):
    """Add message `name` holding map<string, value> `field` = 1, as protoc writes it: a repeated nested
    FooEntry {key = 1; value = 2}."""
    entry = "".join(part.title() for part in field.split("_")) + "Entry"
    _message(messages, name, _field(field, 1, f"{name}.{entry}", repeated=True))
    messages[-1].nested_type.add(name=entry, options={"map_entry": True},
                                 field=[_field("key", 1, "STRING"), _field("value", 2, value)])


def _schema() -> descriptor_pb2.FileDescriptorProto:
    file = descriptor_pb2.FileDescriptorProto(name="tensorflow/core/example/example.proto", package="tensorflow",
                                              syntax="proto3")
    messages = file.message_type
    # feature.proto
    _message(messages, "BytesList", _field("value", 1, "BYTES", repeated=True))
    _message(messages, "FloatList", _field("value", 1, "FLOAT", repeated=True, packed=True))
    _message(messages, "Int64List", _field("value", 1, "INT64", repeated=True, packed=True,
                                           jstype=descriptor_pb2.FieldOptions.JS_STRING))
    _message(messages, "Feature", _field("bytes_list", 1, "BytesList", oneof=0),
             _field("float_list", 2, "FloatList", oneof=0), _field("int64_list", 3, "Int64List", oneof=0),
             oneofs=["kind"])
    _map(messages, "Features", "feature", "Feature")
    _message(messages, "FeatureList", _field("feature", 1, "Feature", repeated=True))
    _map(messages, "FeatureLists", "feature_list", "FeatureList")
    # example.proto
    _message(messages, "Example", _field("features", 1, "Features"))
    _message(messages, "SequenceExample", _field("context", 1, "Features"),
             _field("feature_lists", 2, "FeatureLists"))
    return file


_pool = descriptor_pool.DescriptorPool()
_pool.AddSerializedFile(_schema().SerializeToString())
BytesList, FloatList, Int64List, Feature, Features, FeatureList, FeatureLists, Example, SequenceExample = (
    message_factory.GetMessageClass(_pool.FindMessageTypeByName(f"tensorflow.{name}")) for name in NAMES)
