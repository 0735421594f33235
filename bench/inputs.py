"""Reading what users give the suite: UTF-8 text files and YAML, refused with the file and line of the fault.

YAML is read with YAML 1.2's numbers (`1e-3` is a float, as in JSON and Python; YAML 1.1, PyYAML's default,
reads it as a string) and refused before it is built when its aliases would expand it beyond MAX_NODES nodes
or into a cycle: an alias bomb composes to a few nodes that build into billions.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import yaml

from bench.errors import BenchError

MAX_NODES = 100_000  # a spec has tens of nodes; the largest shipped grid a few hundred


class Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats: an exponent needs no dot and no sign."""


Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


def read_utf8(path: Path) -> str:
    """The text of `path`; a file that is not UTF-8 is a user error naming the line of the first bad byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise BenchError(f"{path}, line {line}: not UTF-8 text (byte {data[error.start]:#04x} at offset "
                         f"{error.start}); save the file as UTF-8") from None


def check_text_file(path: Path, what: str) -> None:
    """A corpus file `datasets` can read: not empty, UTF-8 (its reader fails with a long trace naming neither
    the file nor the line)."""
    if path.stat().st_size == 0:
        raise BenchError(f"{path}: the {what} file is empty")
    read_utf8(path)


def compose(text: str, where: str) -> yaml.Node | None:
    """The YAML document's node graph, checked by `check_size`; a syntax error names the line."""
    loader = Loader(text)
    try:
        root = loader.get_single_node()
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        line = f", line {mark.line + 1}" if mark else ""
        raise BenchError(f"{where}{line}: not valid YAML: {getattr(error, 'problem', None) or error}") from None
    except RecursionError:
        raise BenchError(f"{where}: nested too deeply") from None
    finally:
        loader.dispose()
    if root is not None:
        check_size(root, where)
    return root


def construct(root: yaml.Node | None, where: str):
    """The Python value of a composed (and checked) document."""
    if root is None:
        return None
    try:
        return Loader("").construct_document(root)
    except yaml.YAMLError as error:  # e.g. a tag the safe loader does not build
        mark = getattr(error, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark else ""
        raise BenchError(f"{where}{line}: {getattr(error, 'problem', None) or error}") from None


def load_yaml(text: str, where: str):
    return construct(compose(text, where), where)


def read_yaml_lines(path: Path) -> tuple[object, Callable[[BenchError], BenchError]]:
    """The YAML file's value, and what turns an error about a key path in it (BenchError.key) into one naming
    the file, the line (the node mark of the longest part of the path that the file holds) and the path. A key
    given twice in one mapping, which PyYAML takes silently (the last wins), is an error."""
    root, lines = compose(read_utf8(path), str(path)), {}
    data = construct(root, str(path))

    def add_lines(node: yaml.Node | None, keys: tuple) -> None:
        children = ([(key.value, key, value) for key, value in node.value] if isinstance(node, yaml.MappingNode)
                    else [(index, item, item) for index, item in enumerate(node.value)]
                    if isinstance(node, yaml.SequenceNode) else [])
        for name, marked, value in children:
            where = (*keys, str(name))
            if where in lines:
                raise BenchError(f"{path}, line {marked.start_mark.line + 1}, {'.'.join(where)}: given twice")
            lines[where] = marked.start_mark.line + 1
            add_lines(value, where)

    def locate(error: BenchError) -> BenchError:
        keys = tuple(map(str, error.key))
        line = next((lines[keys[:n]] for n in range(len(keys), 0, -1) if keys[:n] in lines), 1)
        return BenchError(f"{path}, line {line}" + (f", {'.'.join(keys)}" if keys else "") + f": {error}")

    add_lines(root, ())
    return data, locate


def check_size(root: yaml.Node, where: str) -> None:
    """Refuse a document whose aliases would build more than MAX_NODES nodes, or a cycle."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise BenchError(f"{where}, line {node.start_mark.line + 1}: an alias refers to the node holding it")
        open_nodes.add(key)
        children = ([item for pair in node.value for item in pair] if isinstance(node, yaml.MappingNode)
                    else node.value if isinstance(node, yaml.SequenceNode) else [])
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_NODES:
                raise BenchError(f"{where}, line {node.start_mark.line + 1}: its aliases expand to more than "
                                 f"{MAX_NODES:,} values (an alias bomb?)")
        open_nodes.discard(key)
        sizes[key] = total
        return total

    try:
        size(root)
    except RecursionError:
        raise BenchError(f"{where}: nested too deeply") from None
