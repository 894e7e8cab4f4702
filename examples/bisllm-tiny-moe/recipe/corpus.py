"""A licence-clean, offline training corpus built from CPython's own standard library.

Code: the stdlib's `.py` sources (PSF licence), minus tests, demos, generated and literal data
tables, third-party packages, IDLE and the deprecated distutils and lib2to3; plus their short
self-contained documented functions again, each as a document of its own (function_docs).
Chat: question/answer conversations derived from those sources with
`ast` alone (the files are never imported or executed), tool-call conversations over a
whitelist of pure functions whose results the builder computes itself, and a little small
talk. The chat follows the OpenAI message format that the Qwen3-style template renders.

Everything is deterministic for a given stdlib and seed: files are taken in sorted order,
dicts are only iterated in insertion order, and all randomness comes from `random.Random`
instances seeded from `seed` (one per source file, so one file's examples do not depend on
which other files were read).
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import platform
import random
import re
import sysconfig
import textwrap
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Message = dict[str, Any]


@dataclass(frozen=True)
class CodeDoc:
    # Relative to the stdlib root, posix style, e.g. "json/encoder.py"; for a function cut out
    # of a file (see function_docs), the file's path and the function's first line,
    # "json/encoder.py:105".
    path: str
    text: str  # source text with "\n" line endings


@dataclass(frozen=True)
class Conversation:
    # OpenAI chat format. Assistant messages may carry "tool_calls" (arguments as a dict) and
    # "reasoning_content"; tool messages are {"role": "tool", "content": str}.
    messages: list[Message]
    tools: list[dict[str, Any]] | None
    # Which generator made it ("explain", "tool_call", ...): for statistics and tests only,
    # never rendered, and not part of equality.
    kind: str = field(default="", compare=False)


@dataclass(frozen=True)
class Corpus:
    train_code: list[CodeDoc]  # whole files
    heldout_code: list[CodeDoc]
    # Short documented functions cut out of those files (function_docs), on their files' side.
    train_functions: list[CodeDoc]
    heldout_functions: list[CodeDoc]
    train_chat: list[Conversation]
    heldout_chat: list[Conversation]
    stdlib_root: str
    python_version: str  # platform.python_version() of the stdlib used


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


# ---------------------------------------------------------------------------------------------
# Source files

MAX_FILE_BYTES = 300 * 1024
# Directories that hold tests, demos, installers, generated data or third-party code, an
# application (IDLE) and two deprecated packages whose code and names would crowd out the
# library people use (distutils is gone in 3.12, lib2to3 in 3.13).
EXCLUDED_DIR_NAMES = frozenset(
    {
        "__pycache__",
        "dist-packages",
        "distutils",
        "encodings",  # mostly generated codec tables
        "ensurepip",
        "idle_test",
        "idlelib",
        "lib2to3",
        "pydoc_data",  # huge generated help topics
        "site-packages",
        "test",
        "tests",
        "turtledemo",
    }
)
EXCLUDED_DIR_PATHS = frozenset({("venv", "scripts")})
# Build-time generated (it records the build machine's paths), not library code.
EXCLUDED_FILE_PREFIXES = ("_sysconfigdata",)


def _excluded_dir(rel_parts: tuple[str, ...]) -> bool:
    return rel_parts[-1] in EXCLUDED_DIR_NAMES or rel_parts in EXCLUDED_DIR_PATHS


def source_paths(root: Path) -> list[str]:
    """Relative posix paths of the candidate `.py` files under root, sorted."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        # Pruned in place so excluded trees (site-packages can be huge) are never walked.
        dirnames[:] = sorted(d for d in dirnames if not _excluded_dir((*rel_dir.parts, d)))
        found += [
            (rel_dir / name).as_posix()
            for name in filenames
            if name.endswith(".py") and not name.startswith(EXCLUDED_FILE_PREFIXES)
        ]
    return sorted(found)


def read_source(path: Path) -> str | None:
    """The file's text with "\\n" line endings, or None if it is too big or not UTF-8."""
    raw = path.read_bytes()
    if len(raw) > MAX_FILE_BYTES:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def parse_source(text: str) -> ast.Module | None:
    with warnings.catch_warnings():
        # Old code trips SyntaxWarnings (invalid escapes); they are no reason to drop a file.
        warnings.simplefilter("ignore")
        try:
            return ast.parse(text)
        except (SyntaxError, ValueError, RecursionError):
            return None


# A file whose lines are mostly literal data assigned at module level (html/entities.py, token
# tables, keyword lists) teaches a table, not Python; such files are left out.
MAX_DATA_LINE_SHARE = 0.5
_LITERAL_VALUES = (ast.Constant, ast.Dict, ast.List, ast.Set, ast.Tuple)


def data_line_share(tree: ast.Module, text: str) -> float:
    """The share of the file's lines taken by module-level assignments of literal values."""
    data_lines = 0
    for node in tree.body:
        if isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(node.value, _LITERAL_VALUES):
            assert node.end_lineno is not None
            data_lines += node.end_lineno - node.lineno + 1
    return data_lines / max(1, len(text.splitlines()))


def is_heldout_path(path: str, heldout_fraction: float) -> bool:
    """A stable split by path, so a file and every example derived from it share a side."""
    digest = hashlib.sha256(path.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < heldout_fraction


# Files whose public home is another module (the stdlib re-exports them wholesale there).
MODULE_ALIASES = {
    "posixpath": "os.path",
    "_collections_abc": "collections.abc",
    "_pydecimal": "decimal",
    "genericpath": "os.path",  # exists, isfile, getsize, ...: posixpath imports them all
}


def module_name(path: str) -> str:
    """`json/encoder.py` -> `json.encoder`, `json/__init__.py` -> `json`."""
    parts = path.removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def public_module(path: str) -> str | None:
    """The module name users import for path, or None for private and script modules."""
    name = module_name(path)
    name = MODULE_ALIASES.get(name, name)
    parts = name.split(".")
    if not name or any(not p.isidentifier() or p.startswith("_") for p in parts):
        return None
    return name


# ---------------------------------------------------------------------------------------------
# Documented definitions

# A summary is one sentence: every answer that quotes one then has the same, short shape, and
# the model learns to stop after it. Longer first sentences are dropped, not cut.
SUMMARY_MAX_CHARS = 160
MAX_SIGNATURE_CHARS = 300
MAX_EXAMPLE_ARGS = 4
_SIGNATURE_LINE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$")
# ".", "!" or "?" before whitespace or the end, except in "e.g." and "i.e.".
_SENTENCE_END = re.compile(r"(?<!\be\.g)(?<!\bi\.e)[.!?](?=\s|$)")
# reStructuredText roles (:func:`~os.path.join`) and literals (``obj``) -> Markdown `code`.
_RST_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`~?([^`]+)`")

FunctionNode = ast.FunctionDef | ast.AsyncFunctionDef
DefNode = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef


@dataclass(frozen=True)
class Item:
    """A public, documented top-level function or class of a public module."""

    path: str
    module: str
    name: str
    kind: str  # "function" | "class"
    summary: str  # the docstring's first sentence (see summarize)
    signature: str | None  # a parseable snippet declaring it
    example: str | None  # a parseable snippet importing and calling it

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


def first_sentence(text: str) -> str:
    match = _SENTENCE_END.search(text)
    sentence = text[: match.end()] if match else text
    return sentence if sentence.endswith((".", "!", "?")) else sentence + "."


def markdown_code(text: str) -> str:
    """reStructuredText roles and ``literals`` as Markdown `code`, as the chat writes code."""
    return _RST_ROLE.sub(r"`\1`", text).replace("``", "`")


def summarize(docstring: str) -> str | None:
    """The first sentence of the docstring's first prose paragraph, on one line; None if there
    is no such paragraph or the sentence is longer than SUMMARY_MAX_CHARS."""
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", docstring.strip())]
    paragraphs = [p for p in paragraphs if p]
    # C-style docstrings open with a signature line ("dumps(obj) -> str"); the prose follows.
    while paragraphs and _SIGNATURE_LINE.match(paragraphs[0]):
        paragraphs.pop(0)
    if not paragraphs or paragraphs[0].startswith(">>>") or len(paragraphs[0]) < 10:
        return None
    sentence = first_sentence(markdown_code(paragraphs[0]))
    return sentence if len(sentence) <= SUMMARY_MAX_CHARS else None


def _parses(snippet: str) -> bool:
    return parse_source(snippet) is not None


def _find_init(node: ast.ClassDef) -> FunctionNode | None:
    inits = [n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"]
    return inits[-1] if inits else None


def _def_line(node: FunctionNode) -> str:
    keyword = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
    return f"{keyword} {node.name}({ast.unparse(node.args)}){returns}: ..."


def signature_snippet(node: DefNode) -> str | None:
    """`def join(a, *p): ...`, or a class header with its `__init__`; None if unavailable."""
    if isinstance(node, ast.ClassDef):
        init = _find_init(node)
        if init is None:
            return None
        bases = ", ".join(ast.unparse(b) for b in node.bases)
        snippet = f"class {node.name}{f'({bases})' if bases else ''}:\n    {_def_line(init)}"
    else:
        snippet = _def_line(node)
    return snippet if len(snippet) <= MAX_SIGNATURE_CHARS and _parses(snippet) else None


# Literal stand-ins for arguments, by annotation or parameter name; anything else is written
# as the parameter's own name, a placeholder that reads naturally in an example.
_LITERALS_BY_ANNOTATION = {"int": "3", "float": "1.5", "bool": "True", "str": "'hello'"}
_LITERALS_BY_NAME = {
    **dict.fromkeys(("n", "k", "count", "size", "width", "num", "number", "length"), "3"),
    **dict.fromkeys(("index", "level", "pos", "start", "stop", "step", "maxsize"), "3"),
    **dict.fromkeys(("x", "y", "seconds", "timeout", "delay", "value"), "1.5"),
    **dict.fromkeys(("s", "string", "text", "msg", "message", "line", "word"), "'hello world'"),
    **dict.fromkeys(("name", "prefix", "suffix", "key", "tag", "title"), "'example'"),
    **dict.fromkeys(("path", "filename", "file", "fname", "src", "dst"), "'example.txt'"),
    **dict.fromkeys(("dirname", "directory", "dir", "top", "root"), "'.'"),
    **dict.fromkeys(("url", "uri"), "'https://example.com/'"),
    **dict.fromkeys(("data", "buf", "buffer", "b"), "b'data'"),
    **dict.fromkeys(("host", "hostname"), "'localhost'"),
}


def _example_value(arg: ast.arg) -> str:
    annotation = ast.unparse(arg.annotation) if arg.annotation else ""
    if annotation in _LITERALS_BY_ANNOTATION:
        return _LITERALS_BY_ANNOTATION[annotation]
    return _LITERALS_BY_NAME.get(arg.arg.lower(), arg.arg)


def _example_arguments(args: ast.arguments, skip_self: bool) -> str | None:
    """Arguments for the required parameters, or None if there are too many."""
    positional = [*args.posonlyargs, *args.args]
    required = positional[: len(positional) - len(args.defaults)]
    if skip_self and positional:
        if not required:
            return None  # a defaulted `self`: too odd to write an example for
        required = required[1:]
    parts = [_example_value(a) for a in required]
    parts += [
        f"{a.arg}={_example_value(a)}"
        for a, default in zip(args.kwonlyargs, args.kw_defaults, strict=True)
        if default is None
    ]
    return ", ".join(parts) if len(parts) <= MAX_EXAMPLE_ARGS else None


def _is_abstract(node: ast.ClassDef) -> bool:
    names = [ast.unparse(b) for b in node.bases] + [ast.unparse(k) for k in node.keywords]
    return any(n.endswith(("ABC", "Protocol", "ABCMeta")) for n in names)


def example_snippet(module: str, node: DefNode) -> str | None:
    """`from math import gcd` plus a call with simple literal arguments, or None."""
    if isinstance(node, ast.ClassDef):
        init = _find_init(node)
        if init is None or _is_abstract(node):
            return None
        call_args, target = _example_arguments(init.args, skip_self=True), "obj"
    elif isinstance(node, ast.AsyncFunctionDef):
        return None  # would need an event loop around it; the sync ones teach the pattern
    else:
        call_args, target = _example_arguments(node.args, skip_self=False), "result"
    if call_args is None:
        return None
    lines = [f"from {module} import {node.name}", "", f"{target} = {node.name}({call_args})"]
    if target == "result":
        lines.append("print(result)")
    snippet = "\n".join(lines)
    return snippet if _parses(snippet) else None


def _takes_self(node: DefNode) -> bool:
    if isinstance(node, ast.ClassDef):
        return False
    positional = [*node.args.posonlyargs, *node.args.args]
    return bool(positional) and positional[0].arg in ("self", "cls")


def extract_items(path: str, tree: ast.Module) -> list[Item]:
    """The public, documented top-level functions and classes of a public module."""
    module = public_module(path)
    if module is None:
        return []
    defs: dict[str, DefNode] = {}
    for node in tree.body:
        if isinstance(node, DefNode) and not node.name.startswith("_"):
            defs[node.name] = node  # a later definition wins, as at runtime (e.g. @overload)
    items = []
    for name, node in defs.items():
        docstring = ast.get_docstring(node, clean=True)
        summary = summarize(docstring) if docstring else None
        if summary is None:
            continue
        kind = "class" if isinstance(node, ast.ClassDef) else "function"
        signature = example = None
        # A module-level `def f(self, ...)` is a decorator-made object (typing's special
        # forms), not something to call as written.
        if not _takes_self(node):
            signature = signature_snippet(node)
            example = example_snippet(module, node)
        items.append(Item(path, module, name, kind, summary, signature, example))
    return items


# ---------------------------------------------------------------------------------------------
# Short functions as documents of their own

MAX_FUNCTION_LINES = 20


def _is_placeholder(node: ast.stmt) -> bool:
    """`pass` or `...`: a body that shows nothing."""
    if isinstance(node, ast.Pass):
        return True
    value = node.value if isinstance(node, ast.Expr) else None
    return isinstance(value, ast.Constant) and value.value is Ellipsis


def function_docs(path: str, tree: ast.Module, text: str) -> list[CodeDoc]:
    """The file's short, self-contained documented functions, each dedented to a document of
    its own: decorators, header, docstring and a real body, at most MAX_FUNCTION_LINES lines.
    Methods that take `self` or `cls` are left in their classes: their bodies are about
    attributes no document of their own could show.

    A code-completion prompt is a function header and docstring at column 0, and asks for the
    body. Whole files show that too, but among much else and cut into rows anywhere; these
    documents make "header and docstring, then a body using the arguments, then the end of the
    text" a pattern of its own."""
    lines = text.split("\n")
    nodes = [node for node in ast.walk(tree) if isinstance(node, FunctionNode)]
    docs = []
    for node in sorted(nodes, key=lambda n: n.lineno):
        if ast.get_docstring(node) is None or _takes_self(node):
            continue
        if all(map(_is_placeholder, node.body[1:])):
            continue
        first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
        assert node.end_lineno is not None
        if node.end_lineno - first + 1 > MAX_FUNCTION_LINES:
            continue
        snippet = textwrap.dedent("\n".join(lines[first - 1 : node.end_lineno])) + "\n"
        # A docstring line left of the body's indentation keeps the snippet indented.
        if snippet[:1].isspace() or not _parses(snippet):
            continue
        docs.append(CodeDoc(f"{path}:{first}", snippet))
    return docs


# ---------------------------------------------------------------------------------------------
# Conversation assembly

REASONING_PROB = 0.10
SYSTEM_PROMPT_PROB = 0.30
MULTI_TURN_PROB = 0.22  # per documented item; about 5% of all conversations
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a helpful assistant.",
    "You are bisllm-tiny-moe, a helpful assistant for Python questions.",
)
JSON_SYSTEM_PROMPTS = (
    "Answer with a single JSON object and nothing else.",
    "Answer with a single JSON object and nothing else.",
    "Reply with exactly one JSON object and no other text.",
    "Respond only with a JSON object.",
)


@dataclass(frozen=True)
class Turn:
    user: str
    answer: str
    thought: str  # used as reasoning_content when the conversation is picked for reasoning


def _system_messages(rng: random.Random, system: str | None) -> list[Message]:
    # Always draw, so the random stream does not depend on which branch was taken.
    generic = rng.random() < SYSTEM_PROMPT_PROB
    prompt = rng.choice(SYSTEM_PROMPTS)
    if system is None and generic:
        system = prompt
    return [{"role": "system", "content": system}] if system else []


def chat(
    kind: str, turns: Sequence[Turn], rng: random.Random, system: str | None = None
) -> Conversation:
    """User/assistant turns, optionally behind a system prompt and with reasoning at the end."""
    think = rng.random() < REASONING_PROB
    messages = _system_messages(rng, system)
    for turn in turns:
        messages.append({"role": "user", "content": turn.user})
        messages.append({"role": "assistant", "content": turn.answer})
    if think:
        messages[-1]["reasoning_content"] = turns[-1].thought
    return Conversation(messages, None, kind)


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


# ---------------------------------------------------------------------------------------------
# Conversations about documented definitions

EXPLAIN_QUESTIONS = (
    "What does `{q}` do?",
    "Explain {q}.",
    "What is `{q}` for?",
    "Can you explain what `{q}` does?",
    "Briefly describe `{q}`.",
    "Tell me about {q}.",
)
EXPLAIN_INTROS = (
    "`{q}` is a {kind} in the `{m}` module.",
    "`{name}` is a {kind} defined in `{m}`.",
    "In the `{m}` module, `{name}` is a {kind}.",
)
SIGNATURE_QUESTIONS = (
    "What is the signature of `{q}`?",
    "Show the signature of {q}.",
    "How is `{q}` declared?",
    "What arguments does `{q}` take?",
)
MODULE_QUESTIONS = (
    "Which module defines `{name}`?",
    "Where is `{name}` defined in the standard library?",
    "What module do I import `{name}` from?",
    "In which standard library module can I find `{name}`?",
)
JSON_QUESTIONS = (
    "Describe `{q}` as JSON with keys name, module, kind and summary.",
    "Give me a JSON object describing {q} with the keys name, module, kind and summary.",
    "Return JSON with the keys name, module, kind and summary for `{q}`.",
)
CODE_QUESTIONS = (
    "Show how to import and call `{q}`.",
    "Give a short example that uses {q}.",
    "How do I use `{q}`? Show code.",
    "Write a snippet that imports `{name}` from `{m}` and calls it.",
)


def _fields(item: Item) -> dict[str, str]:
    return {"q": item.qualname, "name": item.name, "m": item.module, "kind": item.kind}


def explain_turn(item: Item, rng: random.Random) -> Turn:
    f = _fields(item)
    intro = rng.choice(EXPLAIN_INTROS).format(**f)
    thought = (
        f"The user asks about {item.qualname}. It is a {item.kind} in the {item.module} module; "
        f"its docstring says: {item.summary}"
    )
    return Turn(rng.choice(EXPLAIN_QUESTIONS).format(**f), f"{intro} {item.summary}", thought)


def _signature_answer(item: Item) -> str:
    assert item.signature is not None
    code = f"```python\n{item.signature}\n```"
    return f"`{item.qualname}` is declared as:\n\n{code}\n\n{item.summary}"


def signature_turn(item: Item, rng: random.Random) -> Turn:
    thought = (
        f"The user wants the signature of {item.qualname}. I rebuild it from its definition "
        f"in {item.path}."
    )
    question = rng.choice(SIGNATURE_QUESTIONS).format(**_fields(item))
    return Turn(question, _signature_answer(item), thought)


def module_turn(item: Item, rng: random.Random) -> Turn:
    thought = f"{item.name} is defined in the file {item.path}, which provides {item.module}."
    answer = f"`{item.name}` is defined in the `{item.module}` module."
    return Turn(rng.choice(MODULE_QUESTIONS).format(**_fields(item)), answer, thought)


def json_answer(item: Item) -> str:
    record = {"name": item.name, "module": item.module, "kind": item.kind, "summary": item.summary}
    return json.dumps(record, ensure_ascii=False)


def json_turn(item: Item, rng: random.Random) -> Turn:
    thought = (
        f"I need one JSON object with the keys name, module, kind and summary. {item.qualname} "
        f"is a {item.kind} in the {item.module} module."
    )
    return Turn(rng.choice(JSON_QUESTIONS).format(**_fields(item)), json_answer(item), thought)


def _code_answer(item: Item) -> str:
    assert item.example is not None
    action = "create an instance" if item.kind == "class" else "call it"
    return (
        f"Import `{item.name}` from `{item.module}` and {action}:\n\n```python\n{item.example}\n```"
    )


def code_turn(item: Item, rng: random.Random) -> Turn:
    thought = (
        f"To use {item.qualname}, I import {item.name} from {item.module} and call it with "
        "example arguments."
    )
    question = rng.choice(CODE_QUESTIONS).format(**_fields(item))
    return Turn(question, _code_answer(item), thought)


def follow_up_turn(item: Item, rng: random.Random) -> Turn:
    """A second question about the item just explained, referring to it as "it"."""
    options = [
        Turn(
            "Which module is it in?",
            f"It is defined in the `{item.module}` module.",
            f"The user still means {item.qualname}, from {item.path}.",
        )
    ]
    if item.signature:
        options.append(
            Turn(
                "What is its signature?",
                _signature_answer(item),
                f"The user now wants the signature of {item.qualname}.",
            )
        )
    if item.example:
        options.append(
            Turn(
                "Show me how to use it.",
                _code_answer(item),
                f"The user wants example code for {item.qualname}.",
            )
        )
    return rng.choice(options)


# Modules most programs import. Their definitions get extra explain and JSON conversations,
# each drawn afresh (question, intro, system prompt, reasoning), so that what people ask about
# most is what the model has seen most: one pass over every definition leaves a model this
# size able to answer in the right shape, but not to recall each summary.
_COMMON_MODULE_LIST = (
    "abc argparse base64 bisect calendar collections collections.abc contextlib copy csv "
    "dataclasses datetime difflib enum fnmatch fractions functools glob gzip hashlib heapq html "
    "io json logging operator os os.path pathlib pickle pprint queue random re shlex shutil "
    "socket statistics string subprocess tempfile textwrap threading traceback typing "
    "urllib.parse urllib.request uuid warnings zipfile"
)
COMMON_MODULES = frozenset(_COMMON_MODULE_LIST.split())
COMMON_EXTRA_EXPLAIN = 2
COMMON_EXTRA_JSON = 1


def item_conversations(item: Item, rng: random.Random, unique_name: bool) -> list[Conversation]:
    """Every applicable kind of conversation about item, plus sometimes a two-turn one, and for
    the definitions of COMMON_MODULES some more explain and JSON ones."""
    convs = [chat("explain", [explain_turn(item, rng)], rng)]
    if item.signature:
        convs.append(chat("signature", [signature_turn(item, rng)], rng))
    if unique_name:  # "Which module defines `Error`?" has no single answer
        convs.append(chat("module", [module_turn(item, rng)], rng))
    system = rng.choice(JSON_SYSTEM_PROMPTS)
    convs.append(chat("json", [json_turn(item, rng)], rng, system=system))
    if item.example:
        convs.append(chat("code", [code_turn(item, rng)], rng))
    if rng.random() < MULTI_TURN_PROB:
        turns = [explain_turn(item, rng), follow_up_turn(item, rng)]
        convs.append(chat("multi_turn", turns, rng))
    if item.module in COMMON_MODULES:
        for _ in range(COMMON_EXTRA_EXPLAIN):
            convs.append(chat("explain", [explain_turn(item, rng)], rng))
        for _ in range(COMMON_EXTRA_JSON):
            system = rng.choice(JSON_SYSTEM_PROMPTS)
            convs.append(chat("json", [json_turn(item, rng)], rng, system=system))
    return convs


# ---------------------------------------------------------------------------------------------
# Tools: pure functions the builder evaluates itself, so every tool result is real

_WORD_LIST = (
    "apple banana cherry python river mountain window garden orange silver planet rocket "
    "coffee guitar forest dragon pencil winter summer castle bridge butter candle desert "
    "engine falcon harbor island jacket kitten lemon marble number ocean pepper quartz "
    "rabbit sunset tiger violet wizard yellow zebra"
)
WORDS = tuple(_WORD_LIST.split())


def _word(rng: random.Random) -> str:
    return rng.choice(WORDS)


def _phrase(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def _int_list(rng: random.Random) -> list[int]:
    return [rng.randint(-50, 99) for _ in range(rng.randint(3, 7))]


def _gcd_pair(rng: random.Random) -> dict[str, Any]:
    # A shared factor makes the answer interesting more often than coprime pairs.
    factor = rng.randint(1, 12)
    return {"a": factor * rng.randint(1, 20), "b": factor * rng.randint(1, 20)}


def _comb_args(rng: random.Random) -> dict[str, Any]:
    n = rng.randint(2, 20)
    return {"n": n, "k": rng.randint(0, n)}


def _json_text(rng: random.Random) -> dict[str, Any]:
    key, value = _word(rng), rng.randint(0, 99)
    valid = (f'{{"{key}": {value}}}', f'[{value}, "{key}"]', f'{{"{key}": [1, 2]}}')
    invalid = (f"{{{key}: {value}}}", f"['{key}', {value}]", f'{{"{key}": {value},}}')
    return {"text": rng.choice(valid if rng.random() < 0.5 else invalid)}


def _is_valid_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _schema(kind: str, description: str) -> dict[str, Any]:
    if kind == "array":
        return {"type": "array", "items": {"type": "integer"}, "description": description}
    return {"type": kind, "description": description}


INT, NUM, STR = "integer", "number", "string"


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    params: dict[str, tuple[str, str]]  # name -> (JSON type, description)
    sample: Callable[[random.Random], dict[str, Any]]
    run: Callable[..., Any]
    questions: tuple[str, ...]  # format strings over the arguments
    answer: Callable[[dict[str, Any], Any], str]

    def call(self, args: dict[str, Any]) -> Any:
        # Positionally: math.gcd, len, hex, ... do not accept keyword arguments.
        return self.run(*(args[name] for name in self.params))

    def spec(self) -> dict[str, Any]:
        properties = {p: _schema(kind, desc) for p, (kind, desc) in self.params.items()}
        parameters = {"type": "object", "properties": properties, "required": list(self.params)}
        function = {"name": self.name, "description": self.description, "parameters": parameters}
        return {"type": "function", "function": function}


def _says(template: str) -> Callable[[dict[str, Any], Any], str]:
    return lambda args, result: template.format(result=result, **args)


def _json_verdict(args: dict[str, Any], valid: Any) -> str:
    verdict = "is valid JSON" if valid else "is not valid JSON"
    return f"`{args['text']}` {verdict}."


TOOLS: tuple[Tool, ...] = (
    Tool(
        "gcd",
        "Greatest common divisor of two integers.",
        {"a": (INT, "First integer."), "b": (INT, "Second integer.")},
        _gcd_pair,
        math.gcd,
        (
            "What is the greatest common divisor of {a} and {b}?",
            "Find the GCD of {a} and {b}.",
            "Compute gcd({a}, {b}).",
        ),
        _says("The greatest common divisor of {a} and {b} is {result}."),
    ),
    Tool(
        "lcm",
        "Least common multiple of two integers.",
        {"a": (INT, "First integer."), "b": (INT, "Second integer.")},
        lambda r: {"a": r.randint(2, 40), "b": r.randint(2, 40)},
        math.lcm,
        (
            "What is the least common multiple of {a} and {b}?",
            "Find the LCM of {a} and {b}.",
        ),
        _says("The least common multiple of {a} and {b} is {result}."),
    ),
    Tool(
        "factorial",
        "Factorial of a non-negative integer.",
        {"n": (INT, "A non-negative integer.")},
        lambda r: {"n": r.randint(0, 12)},
        math.factorial,
        ("What is {n} factorial?", "Compute the factorial of {n}.", "What is {n}!?"),
        _says("The factorial of {n} is {result}."),
    ),
    Tool(
        "comb",
        "Number of ways to choose k items from n without order.",
        {"n": (INT, "Number of items."), "k": (INT, "Number of items to choose.")},
        _comb_args,
        math.comb,
        (
            "How many ways are there to choose {k} items from {n}?",
            "What is {n} choose {k}?",
        ),
        _says("There are {result} ways to choose {k} items from {n}."),
    ),
    Tool(
        "isqrt",
        "Integer square root: the largest integer whose square is at most n.",
        {"n": (INT, "A non-negative integer.")},
        lambda r: {"n": r.randint(0, 10_000)},
        math.isqrt,
        ("What is the integer square root of {n}?", "Compute isqrt({n})."),
        _says("The integer square root of {n} is {result}."),
    ),
    Tool(
        "sqrt",
        "Square root of a number, rounded to 4 decimal places.",
        {"x": (NUM, "A non-negative number.")},
        lambda r: {"x": r.randint(2, 1000)},
        lambda x: round(math.sqrt(x), 4),
        (
            "What is the square root of {x}?",
            "Compute the square root of {x} to 4 decimal places.",
        ),
        _says("The square root of {x} is about {result}."),
    ),
    Tool(
        "power",
        "Raise an integer base to a non-negative integer exponent.",
        {"base": (INT, "The base."), "exponent": (INT, "The exponent.")},
        lambda r: {"base": r.randint(2, 12), "exponent": r.randint(0, 10)},
        lambda base, exponent: base**exponent,
        ("What is {base} to the power of {exponent}?", "Compute {base}**{exponent}."),
        _says("{base} to the power of {exponent} is {result}."),
    ),
    Tool(
        "string_length",
        "Number of characters in a string.",
        {"text": (STR, "The string to measure.")},
        lambda r: {"text": _word(r)},
        len,
        (
            'How many characters are in the word "{text}"?',
            'What is the length of the string "{text}"?',
        ),
        _says('The string "{text}" has {result} characters.'),
    ),
    Tool(
        "to_upper",
        "Convert a string to upper case.",
        {"text": (STR, "The string to convert.")},
        lambda r: {"text": _word(r)},
        str.upper,
        ('Convert "{text}" to upper case.', 'What is "{text}" in capital letters?'),
        _says('In upper case, "{text}" is "{result}".'),
    ),
    Tool(
        "to_lower",
        "Convert a string to lower case.",
        {"text": (STR, "The string to convert.")},
        lambda r: {"text": r.choice((str.upper, str.title))(_word(r))},
        str.lower,
        ('Convert "{text}" to lower case.', 'What is "{text}" in small letters?'),
        _says('In lower case, "{text}" is "{result}".'),
    ),
    Tool(
        "to_title",
        "Convert a string to title case: each word starts with a capital letter.",
        {"text": (STR, "The string to convert.")},
        lambda r: {"text": _phrase(r, 2, 4)},
        str.title,
        ('Convert "{text}" to title case.', 'Capitalize each word of "{text}".'),
        _says('In title case, "{text}" is "{result}".'),
    ),
    Tool(
        "reverse_string",
        "Reverse the characters of a string.",
        {"text": (STR, "The string to reverse.")},
        lambda r: {"text": _word(r)},
        lambda text: text[::-1],
        ('Reverse the string "{text}".', 'What is "{text}" spelled backwards?'),
        _says('"{text}" reversed is "{result}".'),
    ),
    Tool(
        "word_count",
        "Number of whitespace-separated words in a text.",
        {"text": (STR, "The text to count words in.")},
        lambda r: {"text": _phrase(r, 2, 9)},
        lambda text: len(text.split()),
        ('How many words are in "{text}"?', 'Count the words in "{text}".'),
        _says('"{text}" has {result} words.'),
    ),
    Tool(
        "sort_numbers",
        "Sort a list of integers in ascending order.",
        {"numbers": ("array", "The integers to sort.")},
        lambda r: {"numbers": _int_list(r)},
        sorted,
        ("Sort these numbers in ascending order: {numbers}.", "Sort the list {numbers}."),
        _says("Sorted in ascending order, {numbers} becomes {result}."),
    ),
    Tool(
        "max_number",
        "Largest integer in a list.",
        {"numbers": ("array", "The integers to compare.")},
        lambda r: {"numbers": _int_list(r)},
        max,
        ("What is the largest number in {numbers}?", "Find the maximum of {numbers}."),
        _says("The largest number in {numbers} is {result}."),
    ),
    Tool(
        "min_number",
        "Smallest integer in a list.",
        {"numbers": ("array", "The integers to compare.")},
        lambda r: {"numbers": _int_list(r)},
        min,
        ("What is the smallest number in {numbers}?", "Find the minimum of {numbers}."),
        _says("The smallest number in {numbers} is {result}."),
    ),
    Tool(
        "sum_numbers",
        "Sum of a list of integers.",
        {"numbers": ("array", "The integers to add up.")},
        lambda r: {"numbers": _int_list(r)},
        sum,
        ("What is the sum of {numbers}?", "Add up the numbers {numbers}."),
        _says("The sum of {numbers} is {result}."),
    ),
    Tool(
        "absolute_value",
        "Absolute value of a number.",
        {"x": (NUM, "A number.")},
        lambda r: {"x": r.choice((-1, 1)) * r.choice((r.randint(1, 500), r.randint(1, 999) / 8))},
        abs,
        ("What is the absolute value of {x}?", "Compute abs({x})."),
        _says("The absolute value of {x} is {result}."),
    ),
    Tool(
        "round_number",
        "Round a number to a given number of decimal places.",
        {"x": (NUM, "The number to round."), "digits": (INT, "Decimal places to keep.")},
        lambda r: {"x": round(r.uniform(-100, 100), 5), "digits": r.randint(0, 3)},
        round,
        ("Round {x} to {digits} decimal places.", "What is {x} rounded to {digits} decimals?"),
        _says("{x} rounded to {digits} decimal places is {result}."),
    ),
    Tool(
        "to_hex",
        "Hexadecimal representation of an integer, with the 0x prefix.",
        {"n": (INT, "The integer to convert.")},
        lambda r: {"n": r.randint(0, 4096)},
        hex,
        ("What is {n} in hexadecimal?", "Convert {n} to hex."),
        _says("{n} in hexadecimal is {result}."),
    ),
    Tool(
        "to_binary",
        "Binary representation of an integer, with the 0b prefix.",
        {"n": (INT, "The integer to convert.")},
        lambda r: {"n": r.randint(0, 255)},
        bin,
        ("What is {n} in binary?", "Convert {n} to binary."),
        _says("{n} in binary is {result}."),
    ),
    Tool(
        "is_valid_json",
        "Check whether a string is valid JSON.",
        {"text": (STR, "The text to check.")},
        _json_text,
        _is_valid_json,
        ("Is `{text}` valid JSON?", "Check whether `{text}` is valid JSON."),
        _json_verdict,
    ),
)
TOOLS_BY_NAME = {tool.name: tool for tool in TOOLS}

NO_TOOL_SHARE = 0.15  # of tool conversations: tools are offered but none is needed
TWO_CALL_SHARE = 0.10  # of tool conversations: two calls in one assistant message
TOOL_HINTS = ("Use the tools.", "You can use the tools.", "Please use a tool for this.")

IDENTITY = (
    "I am bisllm-tiny-moe, a small mixture-of-experts model trained on the Python standard library."
)

# Questions a tool-equipped assistant should answer without calling anything.
PLAIN_QA = (
    ("Hello!", "Hello! How can I help you today?"),
    ("What keyword defines a function in Python?", "Functions are defined with `def`."),
    ("Which keyword defines a class in Python?", "Classes are defined with `class`."),
    ("How do I write a comment in Python?", "Start it with `#`; the rest of the line is ignored."),
    (
        "What does a Python function return if it has no return statement?",
        "It returns `None`.",
    ),
    ("Which statement leaves a loop early?", "The `break` statement ends the innermost loop."),
    (
        "What does the `pass` statement do?",
        "Nothing: it is a placeholder where a statement is required.",
    ),
    ("How do I import the json module?", "Write `import json`."),
    ("What is the difference between a list and a tuple?", "A list is mutable; a tuple is not."),
    (
        "How do I loop over the numbers 0 to 4?",
        "Use `for i in range(5):`; `range(5)` yields 0, 1, 2, 3 and 4.",
    ),
    (
        "How do I open a file for reading?",
        "Use `with open(path) as f:`; the `with` block closes the file for you.",
    ),
    (
        "What is a list comprehension?",
        "A compact way to build a list, for example `[x * x for x in range(5)]`.",
    ),
    ("Who are you?", IDENTITY),
    ("Thanks!", "You're welcome!"),
)


def _tool_content(result: Any) -> str:
    return result if isinstance(result, str) else json.dumps(result)


def _offered_tools(rng: random.Random, called: Sequence[Tool]) -> list[dict[str, Any]]:
    """The called tools plus 1-3 distractors, in random order."""
    called_names = {tool.name for tool in called}
    others = [tool for tool in TOOLS if tool.name not in called_names]
    offered = [*called, *rng.sample(others, rng.randint(1, 3))]
    rng.shuffle(offered)
    return [tool.spec() for tool in offered]


def tool_call_conversation(rng: random.Random, n_calls: int) -> Conversation:
    called = rng.sample(TOOLS, n_calls)
    calls = [(tool, tool.sample(rng)) for tool in called]
    results = [tool.call(args) for tool, args in calls]
    questions = [rng.choice(tool.questions).format(**args) for tool, args in calls]
    user = " Also, ".join([questions[0], *map(_lower_first, questions[1:])])
    if rng.random() < 0.5:
        user += " " + rng.choice(TOOL_HINTS)
    tools = _offered_tools(rng, called)
    think = rng.random() < REASONING_PROB
    messages = _system_messages(rng, None)
    messages.append({"role": "user", "content": user})
    tool_calls = [
        {"type": "function", "function": {"name": tool.name, "arguments": args}}
        for tool, args in calls
    ]
    call_message: Message = {"role": "assistant", "content": "", "tool_calls": tool_calls}
    messages.append(call_message)
    messages += [{"role": "tool", "content": _tool_content(result)} for result in results]
    answer = " ".join(
        tool.answer(args, res) for (tool, args), res in zip(calls, results, strict=True)
    )
    final: Message = {"role": "assistant", "content": answer}
    messages.append(final)
    if think:
        names = " and ".join(f"`{tool.name}`" for tool in called)
        shown = ", ".join(_tool_content(res) for res in results)
        if n_calls == 1:
            call_message["reasoning_content"] = f"The {names} tool can answer this, so I call it."
            final["reasoning_content"] = f"The tool returned {shown}; I state the answer."
        else:
            call_message["reasoning_content"] = f"This needs {names}; I call both at once."
            final["reasoning_content"] = f"The tools returned {shown}; I state both answers."
    return Conversation(messages, tools, "tool_call" if n_calls == 1 else "tool_call_2")


def no_tool_conversation(rng: random.Random) -> Conversation:
    question, answer = rng.choice(PLAIN_QA)
    tools = _offered_tools(rng, [])
    turn = Turn(question, answer, "None of the available tools is needed; I answer directly.")
    conv = chat("no_tool", [turn], rng)
    return Conversation(conv.messages, tools, conv.kind)


def tool_conversation(rng: random.Random) -> Conversation:
    roll = rng.random()
    if roll < NO_TOOL_SHARE:
        return no_tool_conversation(rng)
    return tool_call_conversation(rng, 2 if roll < NO_TOOL_SHARE + TWO_CALL_SHARE else 1)


# ---------------------------------------------------------------------------------------------
# Small talk

SMALL_TALK = (
    (("Hello", "Hi!", "Hey there.", "Good morning!"), "Hello! How can I help you with Python?"),
    (("Who are you?", "What are you?", "Introduce yourself."), IDENTITY),
    (("What is your name?",), "My name is bisllm-tiny-moe."),
    (
        ("What can you do?", "How can you help me?"),
        "I can explain modules, functions and classes of the Python standard library, show "
        "their signatures and short examples, answer in JSON, and call tools when they are "
        "provided.",
    ),
    (("Thanks!", "Thank you."), "You're welcome!"),
    (("Bye!", "Goodbye."), "Goodbye! Happy coding."),
)
SMALL_TALK_MULTI_TURN_PROB = 0.3


def small_talk_turn(rng: random.Random) -> Turn:
    questions, answer = rng.choice(SMALL_TALK)
    return Turn(rng.choice(questions), answer, "This is small talk; I reply briefly.")


def small_talk_conversation(rng: random.Random) -> Conversation:
    n_turns = 2 if rng.random() < SMALL_TALK_MULTI_TURN_PROB else 1
    return chat("small_talk", [small_talk_turn(rng) for _ in range(n_turns)], rng)


# ---------------------------------------------------------------------------------------------
# The corpus

TOOL_SHARE = 0.20  # of all conversations
SMALL_TALK_SHARE = 0.015
# Floors, so that tiny roots (tests, smoke runs) still get every kind of conversation.
MIN_TOOL_CONVERSATIONS = 60
MIN_SMALL_TALK_CONVERSATIONS = 10


@dataclass(frozen=True)
class Source:
    doc: CodeDoc
    items: list[Item]
    functions: list[CodeDoc]


def load_sources(root: Path, max_code_bytes: int | None = None) -> list[Source]:
    """Parseable sources in sorted path order; with a cap, those that still fit in it."""
    sources: list[Source] = []
    total = 0
    for rel in source_paths(root):
        text = read_source(root / rel)
        if text is None:
            continue
        size = len(text.encode())
        # A file that does not fit is skipped, not the end: smaller later ones may still fit.
        if max_code_bytes is not None and total + size > max_code_bytes:
            continue
        tree = parse_source(text)
        if tree is None or data_line_share(tree, text) > MAX_DATA_LINE_SHARE:
            continue
        total += size
        functions = function_docs(rel, tree, text)
        sources.append(Source(CodeDoc(rel, text), extract_items(rel, tree), functions))
    return sources


def _file_rng(seed: int, path: str) -> random.Random:
    # String seeds are hashed with SHA-512 by random.Random, so this is stable across runs.
    return random.Random(f"{seed}:file:{path}")


def _derived_conversations(sources: Sequence[Source], seed: int) -> list[list[Conversation]]:
    """Per source, the conversations about its documented definitions."""
    name_counts = Counter(item.name for source in sources for item in source.items)
    result = []
    for source in sources:
        rng = _file_rng(seed, source.doc.path)
        convs = []
        for item in source.items:
            convs += item_conversations(item, rng, unique_name=name_counts[item.name] == 1)
        result.append(convs)
    return result


def build_corpus(
    root: Path | None = None,
    seed: int = 0,
    heldout_fraction: float = 0.03,
    max_code_bytes: int | None = None,
) -> Corpus:
    root = Path(root) if root is not None else stdlib_root()
    sources = load_sources(root, max_code_bytes)
    train_code: list[CodeDoc] = []
    heldout_code: list[CodeDoc] = []
    train_functions: list[CodeDoc] = []
    heldout_functions: list[CodeDoc] = []
    train_chat: list[Conversation] = []
    heldout_chat: list[Conversation] = []
    n_derived = 0
    for source, convs in zip(sources, _derived_conversations(sources, seed), strict=True):
        heldout = is_heldout_path(source.doc.path, heldout_fraction)
        (heldout_code if heldout else train_code).append(source.doc)
        (heldout_functions if heldout else train_functions).extend(source.functions)
        (heldout_chat if heldout else train_chat).extend(convs)
        n_derived += len(convs)

    # Tool and small-talk conversations come from no file, so a coin decides their side.
    n_total = n_derived / (1 - TOOL_SHARE - SMALL_TALK_SHARE)
    extra_rng = random.Random(f"{seed}:extra")
    extras = [
        tool_conversation(extra_rng)
        for _ in range(max(MIN_TOOL_CONVERSATIONS, round(n_total * TOOL_SHARE)))
    ]
    extras += [
        small_talk_conversation(extra_rng)
        for _ in range(max(MIN_SMALL_TALK_CONVERSATIONS, round(n_total * SMALL_TALK_SHARE)))
    ]
    for conv in extras:
        (heldout_chat if extra_rng.random() < heldout_fraction else train_chat).append(conv)

    shuffle_rng = random.Random(f"{seed}:shuffle")
    shuffle_rng.shuffle(train_chat)
    shuffle_rng.shuffle(heldout_chat)
    return Corpus(
        train_code=train_code,
        heldout_code=heldout_code,
        train_functions=train_functions,
        heldout_functions=heldout_functions,
        train_chat=train_chat,
        heldout_chat=heldout_chat,
        stdlib_root=str(root),
        python_version=platform.python_version(),
    )


def kind_counts(conversations: Iterable[Conversation]) -> dict[str, int]:
    """Conversations per kind, plus how many carry reasoning, have a system prompt, or have
    more than one user turn."""
    counts: Counter[str] = Counter()
    for conv in conversations:
        counts[conv.kind] += 1
        roles = [m["role"] for m in conv.messages]
        counts["+reasoning"] += any("reasoning_content" in m for m in conv.messages)
        counts["+system"] += roles[0] == "system"
        counts["+two_user_turns"] += roles.count("user") >= 2
    return dict(sorted(counts.items()))


def main() -> None:
    corpus = build_corpus()
    chats = corpus.train_chat + corpus.heldout_chat
    print(f"Python {corpus.python_version} stdlib at {corpus.stdlib_root}")
    for split, docs in (("train", corpus.train_code), ("heldout", corpus.heldout_code)):
        n_bytes = sum(len(d.text.encode()) for d in docs)
        print(f"{split} code: {len(docs)} files, {n_bytes} bytes")
    for split, docs in (("train", corpus.train_functions), ("heldout", corpus.heldout_functions)):
        n_bytes = sum(len(d.text.encode()) for d in docs)
        print(f"{split} functions: {len(docs)}, {n_bytes} bytes")
    print(f"chat: {len(corpus.train_chat)} train, {len(corpus.heldout_chat)} heldout")
    for kind, count in kind_counts(chats).items():
        print(f"  {kind}: {count}")


if __name__ == "__main__":
    main()
