"""One-line errors: what the command line prints instead of a traceback or jsonargparse's usage dump.

Two kinds of failure reach the user. An exception raised while the run is built or started (a check in a
constructor, a bad checkpoint, Lightning's own argument checks) is printed by ``python -m lightning_ddd``
as its own message, dug out of the "Does not validate against any of the Union subtypes" blocks that
jsonargparse wraps around errors raised in nested objects (:func:`explain`). An error of the parser itself
(an unknown class name or key, a value of the wrong type, an unreadable config file) is diagnosed from
jsonargparse's chain of exceptions (:func:`explain_parser_error`) and names the closest valid choices.

``LIGHTNING_DDD_TRACEBACK=1`` turns both off: tracebacks and jsonargparse's full messages come back.
"""

from __future__ import annotations

import collections.abc
import difflib
import importlib
import inspect
import os
import re
from collections.abc import Iterable

TRACEBACK_ENV = "LIGHTNING_DDD_TRACEBACK"
#: appended to every one-line error
HINT = f"(set {TRACEBACK_ENV}=1 for the full message)"

#: first lines of the messages jsonargparse wraps around the error that caused them
_WRAPPERS = (
    "Does not validate against any of the Union subtypes",
    "Problem with given class_path",
    'Parser key "',
    "- Expected a path but",
    "Expected a path but",
)


def traceback_requested() -> bool:
    """Whether the user asked for tracebacks and jsonargparse's full messages."""
    return os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions whose message is written for the user: bad values, missing files, missing packages,
    Lightning's argument checks."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    return (ValueError, ImportError, MisconfigurationException, FileNotFoundError, FileExistsError,
            NotADirectoryError, IsADirectoryError, PermissionError)


def one_line(text: str) -> str:
    """Collapse whitespace and newlines into single spaces."""
    return " ".join(str(text).split())


def _chain(err: BaseException | None) -> list[BaseException]:
    """``err`` and its causes, outermost first (jsonargparse chains with ``raise ... from``)."""
    out: list[BaseException] = []
    while err is not None and all(err is not seen for seen in out):
        out.append(err)
        err = err.__cause__ if err.__cause__ is not None else (None if err.__suppress_context__ else err.__context__)
    return out


def _is_wrapper(err: BaseException) -> bool:
    text = str(err).lstrip()
    return type(err).__module__.startswith("jsonargparse") or text.startswith(_WRAPPERS) or (
        "expects a function or a callable class:" in text.split("\n", 1)[0])


def own_error(err: BaseException) -> BaseException:
    """The error a model, DataModule, callback, loss or settings object raised, unwrapped from the messages
    jsonargparse wraps around it (one per level of nesting)."""
    while _is_wrapper(err):
        cause = err.__cause__ if err.__cause__ is not None else err.__context__
        if cause is None:
            break
        err = cause
    return err


def explain(err: BaseException) -> str | None:
    """The one-line message for an error raised while a run is built or started; None for a bug (an
    unexpected exception outside any constructor), which keeps its traceback."""
    install = _install_hint(err)
    if install:
        return install
    root = own_error(err)
    if isinstance(root, user_error_types()):
        return one_line(root) or type(root).__name__
    if root is not err:  # raised inside a constructor that jsonargparse called: still the user's input
        return one_line(f"{type(root).__name__}: {root}")
    return None


def _install_hint(err: BaseException) -> str | None:
    from lightning_ddd.extras import install_hint

    for e in _chain(err):
        if isinstance(e, ModuleNotFoundError) and e.name:
            return install_hint(e.name)
    return None


# ---- parser errors ------------------------------------------------------------------------------------


def closest(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """Up to ``n`` choices close to ``name`` (case-insensitive), best first."""
    choices = list(dict.fromkeys(choices))
    lowered = {c.lower(): c for c in choices}
    found = difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.6)
    return [lowered[f] for f in found]


def suggestion(name: str, choices: Iterable[str], listed: int = 12) -> str:
    """"; did you mean X?" or, when nothing is close and the choices are few, "; choose from A, B, C"."""
    choices = sorted(dict.fromkeys(choices))
    near = closest(name, choices)
    if near:
        return f"; did you mean {_or(near)}?"
    if choices and len(choices) <= listed:
        return "; choose from " + ", ".join(choices)
    return ""


def _or(names: list[str]) -> str:
    """"A", "A or B", "A, B or C"."""
    return f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]


def known_subclasses(bases: Iterable[type]) -> list[type]:
    """Concrete, public subclasses of ``bases`` (and the bases themselves) among the classes imported so far."""
    found: dict[type, None] = {}
    pending = list(bases)
    while pending:
        cls = pending.pop()
        if cls in found:
            continue
        found[cls] = None
        pending.extend(cls.__subclasses__())
    return [c for c in found if not inspect.isabstract(c) and not c.__name__.startswith("_")
            and not c.__module__.startswith("_") and ".tests." not in f".{c.__module__}."]


def import_path(path: str) -> object | None:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name) if module else None
    except Exception:  # noqa: BLE001  (any failure: no suggestion, the message still names the value)
        return None


def _base_classes(typehint_text: str) -> list[type]:
    """The classes named in a jsonargparse type description, e.g. "Subtypes: [<class 'a.B'>, ...]",
    "list[a.B]" or "typing.Callable[[int], a.B]" (the return type)."""
    names = re.findall(r"<class '([\w.]+)'>", typehint_text)
    names += re.findall(r"list\[([\w.]+)\]", typehint_text)
    names += re.findall(r"Callable\[\[.*?\], ([\w.]+)\]", typehint_text)
    classes = [import_path(name) for name in dict.fromkeys(names) if "." in name and not name.startswith("builtins.")]
    return [c for c in classes if inspect.isclass(c) and c is not type(None)]


def _annotation_classes(class_path: str, name: str) -> list[type]:
    """The classes in the annotation of ``name`` in ``class_path``'s ``__init__`` (Union members, list items and
    a Callable's return type)."""
    import typing

    cls = import_path(class_path)
    try:
        hint = typing.get_type_hints(cls.__init__).get(name)
    except Exception:  # noqa: BLE001  (an unresolvable annotation: no suggestion)
        return []
    found, pending = [], [hint]
    while pending:
        hint = pending.pop(0)
        if inspect.isclass(hint) and hint is not type(None):
            found.append(hint)
            continue
        args = typing.get_args(hint)
        if typing.get_origin(hint) in (collections.abc.Callable,) and args:
            pending.append(args[-1])  # Callable[[...], R] -> R
        else:
            pending.extend(a for a in args if not isinstance(a, list))
    return found


def _class_label(bases: list[type]) -> str:
    return bases[0].__name__ if bases else "class"


def _head(err: BaseException) -> str:
    """The first non-empty line of an exception's message, without a leading "- "."""
    for line in str(err).splitlines():
        line = line.strip().removeprefix("- ").strip()
        if line:
            return line
    return ""


def _key(segments: list[tuple[str, str]], *extra: str) -> str:
    """The config key of a chain of 'Parser key' and 'class_path' levels: a class level adds "init_args"."""
    parts: list[str] = []
    pending_init = False
    for kind, value in segments:
        if kind == "class":
            pending_init = True
            continue
        if pending_init and parts:
            parts.append("init_args")
        pending_init = False
        parts.append(value)
    for value in extra:
        if pending_init and parts:
            parts.append("init_args")
        pending_init = False
        parts.append(value)
    return ".".join(parts)


def _type_name(text: str) -> str:
    return re.sub(r"<class '(?:builtins\.)?([\w.]+)'>", r"\1", text)


def _raised_by_jsonargparse(err: BaseException) -> bool:
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is None or "jsonargparse" in tb.tb_frame.f_code.co_filename


def explain_parser_error(message: str, ex: BaseException | None, option_keys: Iterable[str] = (),
                         config_files: Iterable[str] = ()) -> str:
    """One line for a jsonargparse error: the config key, the bad value and the closest valid names.

    Args:
        message: the parser's message (several lines, a tree of the alternatives it tried).
        ex: the exception the parser reports; its ``__cause__`` chain holds one level per nesting.
        option_keys: the top-level options (for an unknown ``--option``).
        config_files: the config files on the command line (for a YAML syntax error).
    """
    chain = _chain(ex) if ex is not None else []
    segments: list[tuple[str, str]] = []
    bases: list[type] = []
    valid_keys: list[str] = []
    given = None
    for err in chain:
        text = str(err)
        head = _head(err)
        segment = None
        if m := re.match(r'Parser key "([^"]+)":', head):
            segment = ("key", m.group(1))
        elif m := re.match(r"Problem with given class_path '([^']+)':", head):
            segment = ("class", m.group(1))
        elif head.startswith("Type ") and " expects a function or a callable class" in head:
            # a factory argument (backbone, optimizer) given as a class and its init_args
            if m := re.search(r"Got value: Namespace\(class_path='([^']+)'", text):
                segment = ("class", m.group(1))
        if segment is not None and (not segments or segments[-1] != segment):  # wrappers repeat their message
            if segment[0] == "key":
                bases = []  # the types of this key, not of the one above it
            segments.append(segment)
        if "Subtypes: [" in text:
            found = _base_classes(text.split("Errors:", 1)[0])
            bases = found or bases
            if m := re.search(r"^Given value: (.*)$", text, flags=re.M):
                given = m.group(1)
        elif m := re.search(r"Type ([^\n]+?) expects a function or a callable class", text):
            bases = _base_classes(m.group(1)) or bases
        valid_keys = list(getattr(err, "lightning_ddd_keys", valid_keys))
    if not bases and len(segments) >= 2 and segments[-2][0] == "class" and segments[-1][0] == "key":
        bases = _annotation_classes(segments[-2][1], segments[-1][1])  # e.g. a bare name for a factory
    leaf = chain[-1] if chain else None
    leaf_text = one_line(leaf) if leaf is not None else one_line(message)
    cls = next((value for kind, value in reversed(segments) if kind == "class"), None)
    cls_name = cls.rpartition(".")[2] if cls else None

    # an init argument or key that the class does not take
    m = re.match(r"Option '([^']+)' is not accepted", leaf_text) or re.match(
        r"unrecognized arguments: --?([\w.\-]+)", leaf_text)
    if m and segments:
        bad = m.group(1).split("=", 1)[0]
        owner = f"{cls_name} has" if cls_name else "there is"
        takes_none = " (it takes none)" if cls_name and not valid_keys else ""
        return f"{_key(segments, bad)}: {owner} no argument '{bad}'{takes_none}" + suggestion(bad, valid_keys)
    if m:  # a top-level option
        bad = m.group(1).split("=", 1)[0]
        options = [k.lstrip("-") for k in option_keys if k.startswith("--")]
        near = closest(bad, options)
        hint = f"; did you mean {_or(['--' + n for n in near])}?" if near else "; see --help"
        return f"unknown option --{bad}{hint}"

    # a class name that does not exist
    bad = None
    if m := re.match(r"Expected a dot import path string: (\S+)", leaf_text):
        bad = m.group(1)
    elif isinstance(leaf, (AttributeError, ImportError)) and segments:
        bad = given if given and " " not in given and "(" not in given else None
        if m := re.match(r"module '([\w.]+)' has no attribute '(\w+)'", leaf_text):
            bad = f"{m.group(1)}.{m.group(2)}"
    elif m := re.match(r"Import path (\S+) does not (?:correspond to a subclass of|implement protocol) (\w+)",
                       leaf_text):
        bad = m.group(1)
        found = [c for c in known_subclasses(bases) if c.__name__ == m.group(2)]
        bases = found or bases
    if bad is not None:
        module, _, name = bad.rpartition(".")
        classes = [c for c in known_subclasses(bases) if c not in bases]
        # a dotted name: the classes of that module first (lightning_ddd.callbacks.X -> its callbacks)
        in_module = [c for c in classes if module and c.__module__.startswith(module)]
        choices = [c.__name__ for c in (in_module or classes)]
        label = _class_label(bases)
        key = _key(segments) or (m.group(1) if (m := re.match(r"(--[\w.]+): ", message)) else "value")
        exists = import_path(bad) is not None if "." in bad else False
        what = f"'{bad}' is not a {label}" if exists else f"no {label} is called '{bad}'"
        return f"{key}: {what}" + suggestion(name, choices)

    # a YAML or JSON file that does not parse
    if "Problems parsing config" in message or "Problems parsing config" in leaf_text:
        return _config_syntax_error(config_files) or one_line(message)

    # a value of the wrong type, or the project's own check raised while parsing
    if leaf is not None and not _raised_by_jsonargparse(leaf):
        return explain(leaf) or leaf_text
    key = _key(segments)
    detail = re.sub(r"^Expected an? ", "expected ", _type_name(leaf_text))
    if re.fullmatch(r"expected [\w.]+", detail) and given is not None:
        detail += f". Got value: {given}"
    return f"{key}: {detail}" if key else one_line(_type_name(message))


def _config_syntax_error(paths: Iterable[str]) -> str | None:
    """'file: line L, column C: problem' for the first config file that is not valid YAML."""
    import yaml

    for path in paths:
        try:
            with open(path) as f:
                yaml.safe_load(f)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err)
            return f"config file '{path}' is not valid YAML:{where} {one_line(problem)}"
        except OSError:
            continue
    return None
