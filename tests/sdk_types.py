"""Checks request bodies against the providers' official request types, strictly.

    python sdk_types.py openai BODY.json [BODY.json ...]
    python sdk_types.py anthropic BODY.json [BODY.json ...]

The `openai` and `anthropic` Python SDKs define every request as TypedDicts. This walks a body
against them: every key must be one the type declares, every required key present, every value
of a declared type (literals, unions, lists and nested TypedDicts included). Exit 1 with each
problem's path on stdout when a body does not conform.
"""

import json
import sys
import typing
from collections.abc import Iterable, Mapping, Sequence

import typing_extensions


def is_typeddict(t):
    return typing_extensions.is_typeddict(t) or typing.is_typeddict(t)


def unwrap(t):
    """Strips Required/NotRequired/ReadOnly/Annotated wrappers."""
    while True:
        origin = typing_extensions.get_origin(t)
        if origin in (
            typing_extensions.Required,
            typing_extensions.NotRequired,
            typing_extensions.ReadOnly,
            typing.Required,
            typing.NotRequired,
        ):
            t = typing_extensions.get_args(t)[0]
        elif origin is typing_extensions.Annotated or origin is typing.Annotated:
            t = typing_extensions.get_args(t)[0]
        else:
            return t


def check(value, t, path):
    """The problems with `value` as a `t`, as a list of strings (empty: it conforms)."""
    t = unwrap(t)
    if t is typing.Any or t is object:
        return []
    if t is type(None):
        return [] if value is None else [f"{path}: expected null, got {value!r:.60}"]
    if is_typeddict(t):
        if not isinstance(value, dict):
            return [f"{path}: expected an object ({t.__name__}), got {type(value).__name__}"]
        hints = typing_extensions.get_type_hints(t, include_extras=True)
        problems = []
        for key in value:
            if key not in hints:
                problems.append(f"{path}.{key}: not a field of {t.__name__}")
        for key in getattr(t, "__required_keys__", ()):
            if key not in value:
                problems.append(f"{path}: {t.__name__} requires `{key}`")
        for key, v in value.items():
            if key in hints:
                problems += check(v, hints[key], f"{path}.{key}")
        return problems
    origin = typing_extensions.get_origin(t)
    args = typing_extensions.get_args(t)
    if origin is typing.Union or (sys.version_info >= (3, 10) and origin is __import__("types").UnionType):
        attempts = [check(value, a, path) for a in args]
        if any(not a for a in attempts):
            return []
        # The member that got furthest: fewest problems, then the deepest.
        best = min(attempts, key=lambda a: (len(a), -max(len(p) for p in a)))
        return best if len(args) == 1 else [f"{path}: matches no member of the union; closest: {best[:3]}"]
    if origin is typing.Literal or origin is typing_extensions.Literal:
        return [] if value in args else [f"{path}: {value!r:.60} is not one of {args}"]
    if origin in (list, Sequence, Iterable, typing.List) or t in (list,):
        if not isinstance(value, list):
            return [f"{path}: expected a list, got {type(value).__name__}"]
        item = args[0] if args else typing.Any
        problems = []
        for i, v in enumerate(value):
            problems += check(v, item, f"{path}[{i}]")
        return problems
    if origin in (dict, Mapping, typing.Dict) or t is dict:
        if not isinstance(value, dict):
            return [f"{path}: expected an object, got {type(value).__name__}"]
        if len(args) == 2:
            problems = []
            for k, v in value.items():
                problems += check(v, args[1], f"{path}.{k}")
            return problems
        return []
    if t is str:
        return [] if isinstance(value, str) else [f"{path}: expected a string, got {value!r:.60}"]
    if t is bool:
        return [] if isinstance(value, bool) else [f"{path}: expected a bool, got {value!r:.60}"]
    if t is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return [] if ok else [f"{path}: expected an integer, got {value!r:.60}"]
    if t is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return [] if ok else [f"{path}: expected a number, got {value!r:.60}"]
    if isinstance(t, type):
        return [] if isinstance(value, t) else [f"{path}: expected {t.__name__}, got {type(value).__name__}"]
    # A type the SDK uses that this walker does not know: say so rather than pass it.
    return [f"{path}: cannot check against {t!r}"]


def main():
    provider, paths = sys.argv[1], sys.argv[2:]
    if provider == "openai":
        from openai.types.chat import completion_create_params as params

        request_type = params.CompletionCreateParamsNonStreaming
    elif provider == "anthropic":
        from anthropic.types import message_create_params as params

        request_type = params.MessageCreateParamsNonStreaming
    else:
        sys.exit(f"unknown provider {provider}")
    failed = False
    for path in paths:
        with open(path) as f:
            body = json.load(f)
        problems = check(body, request_type, "body")
        if problems:
            failed = True
            print(f"{path}: {len(problems)} problems against {request_type.__name__}")
            for p in problems:
                print(f"  {p}")
        else:
            print(f"{path}: conforms to {request_type.__name__}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
