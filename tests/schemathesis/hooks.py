"""Teaches schemathesis the line-oriented bodies suppressd takes and streams back.

Loaded by tests/openapi.rs through SCHEMATHESIS_HOOKS. Text and NDJSON request bodies accept any
bytes (a bad line gets its own error result), so a generated value is written as lines; NDJSON
responses are read back as a list, one JSON value per line, for schema validation.
"""

import json

import schemathesis


def _lines(value, as_json):
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, str) and not as_json:
            out.append(item.replace("\n", " "))
        else:
            out.append(json.dumps(item))
    return ("\n".join(out) + "\n").encode()


@schemathesis.serializer("text/plain", "text/csv")
def text_lines(ctx, value):
    return _lines(value, as_json=False)


@schemathesis.serializer("application/x-ndjson")
def ndjson_lines(ctx, value):
    return _lines(value, as_json=True)


@schemathesis.deserializer("application/x-ndjson")
def ndjson_values(ctx, response):
    # Not splitlines(): JSON strings may hold U+2028 and other characters it splits at.
    return [json.loads(line) for line in response.content.decode().split("\n") if line.strip()]
