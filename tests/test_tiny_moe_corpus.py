"""The bisllm-tiny-moe corpus builder: file selection, split, and the shape of every example."""

from __future__ import annotations

import ast
import json
import math
import platform
import random
import re
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "bisllm-tiny-moe"))
from recipe import corpus

STDLIB_CAP = 300_000
SPLIT_MODULES = [f"mod{i:02d}" for i in range(12)]

# A handmade stdlib: what must be kept, and what every exclusion rule must drop.
KEPT_FILES = {
    "alpha.py": (
        '"""Alpha module."""\n\n\n'
        "def alpha_add(a, b=1):\n"
        '    """Add b to a.\n\n    Details that are not part of the summary.\n    """\n'
        "    return a + b\n\n\n"
        "class AlphaBox:\n"
        '    """A box that holds one value."""\n\n'
        "    def __init__(self, value):\n"
        "        self.value = value\n\n"
        "    @property\n"
        "    def doubled(self):\n"
        '        """The value, twice."""\n'
        "        return 2 * self.value\n\n"
        "    @staticmethod\n"
        "    def make(value):\n"
        '        """Build a box around value."""\n'
        "        return AlphaBox(value)\n\n\n"
        "def _alpha_private():\n"
        '    """Private helper."""\n\n\n'
        "def alpha_undocumented():\n"
        "    pass\n\n\n"
        "def alpha_placeholder():\n"
        '    """Documented, but with no body to show."""\n'
        "    pass\n\n\n"
        "def alpha_long(x):\n"
        '    """Too long to be a function document."""\n'
        + "".join(f"    x += {i}\n" for i in range(20))
        + "    return x\n"
    ),
    "pkg/__init__.py": (
        "def pkg_hello(name: str) -> str:\n"
        '    """Return a greeting for name."""\n'
        '    return "hi " + name\n'
    ),
    "pkg/beta.py": ('def beta_scale(x, *, factor):\n    """Multiply x by factor."""\n'),
    "crlf.py": 'def crlf_func():\r\n    """Written with Windows line endings."""\r\n',
    # A module of COMMON_MODULES: its definitions get extra conversations.
    "json.py": 'def json_encode(obj):\n    """Encode obj as JSON text."""\n    return str(obj)\n',
    "_private.py": 'def private_mod_func():\n    """Lives in a private module."""\n',
    **{
        f"{name}.py": f'def func_{name}(x):\n    """Return x unchanged ({name})."""\n    return x\n'
        for name in SPLIT_MODULES
    },
}
EXCLUDED_FILES = {
    "test/test_x.py": "test_x_func",
    "pkg/tests/t.py": "tests_t_func",
    "__pycache__/x.py": "cache_func",
    "site-packages/third.py": "third_func",
    "encodings/table.py": "table_func",
    "idlelib/idle_test/h.py": "idle_func",
    "turtledemo/demo.py": "demo_func",
    "idlelib/editor.py": "idle_editor_func",
    "lib2to3/fixer_util.py": "lib2to3_func",
    "distutils/util.py": "distutils_func",
    "bad.py": "bad_func",
}
NEVER_MENTIONED = [
    *EXCLUDED_FILES.values(),
    "latin_func",
    "big_func",
    "tables_func",
    "private_mod_func",
    "_alpha_private",
    "alpha_undocumented",
]


def _documented(name: str) -> str:
    return f'def {name}():\n    """Documented so that it would yield examples."""\n'


@pytest.fixture(scope="module")
def handmade_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stdlib")
    files: dict[str, bytes] = {path: text.encode() for path, text in KEPT_FILES.items()}
    files |= {path: _documented(name).encode() for path, name in EXCLUDED_FILES.items()}
    files["bad.py"] += b"x = (\n"  # a syntax error
    files["latin.py"] = _documented("latin_func").encode() + b"# caf\xe9\n"  # not UTF-8
    files["big.py"] = _documented("big_func").encode() + b"#" * (corpus.MAX_FILE_BYTES + 1)
    # Mostly a literal table: left out, though it parses and documents a function.
    table = "".join(f"    'key{i}': {i},\n" for i in range(12))
    files["tables.py"] = (_documented("tables_func") + f"TABLE = {{\n{table}}}\n").encode()
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


@pytest.fixture(scope="module")
def handmade(handmade_root: Path) -> corpus.Corpus:
    return corpus.build_corpus(handmade_root, heldout_fraction=0.5)


@pytest.fixture(scope="module")
def stdlib() -> corpus.Corpus:
    return corpus.build_corpus(max_code_bytes=STDLIB_CAP)


def _chats(c: corpus.Corpus) -> list[corpus.Conversation]:
    return c.train_chat + c.heldout_chat


def _text(conv: corpus.Conversation) -> str:
    return json.dumps(conv.messages, ensure_ascii=False)


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)\n```", text, flags=re.DOTALL)


# --- files --------------------------------------------------------------------------------------


def test_exclusions(handmade: corpus.Corpus) -> None:
    paths = {doc.path for doc in handmade.train_code + handmade.heldout_code}
    assert paths == set(KEPT_FILES)
    mentions = "\n".join(_text(conv) for conv in _chats(handmade))
    for name in NEVER_MENTIONED:
        assert name not in mentions
    for name in ("alpha_add", "AlphaBox", "pkg_hello", "beta_scale", "crlf_func"):
        assert name in mentions


def test_code_docs_are_normalised(handmade: corpus.Corpus) -> None:
    docs = {doc.path: doc.text for doc in handmade.train_code + handmade.heldout_code}
    assert "\r" not in docs["crlf.py"]
    assert docs["crlf.py"] == KEPT_FILES["crlf.py"].replace("\r\n", "\n")
    assert docs["alpha.py"] == KEPT_FILES["alpha.py"]


def test_module_names() -> None:
    assert corpus.module_name("json/encoder.py") == "json.encoder"
    assert corpus.module_name("json/__init__.py") == "json"
    assert corpus.public_module("posixpath.py") == "os.path"
    assert corpus.public_module("genericpath.py") == "os.path"
    assert corpus.public_module("asyncio/__main__.py") is None
    assert corpus.public_module("_strptime.py") is None


def test_summaries() -> None:
    assert corpus.summarize("dumps(obj) -> str\n\nSerialize obj.\n\nMore.") == "Serialize obj."
    assert corpus.summarize("Join the\n    parts.\n\nDetails.") == "Join the parts."
    # The first sentence only; "e.g." and "i.e." do not end one; a missing period is added.
    assert corpus.summarize("Split a path. Return a tuple.") == "Split a path."
    assert corpus.summarize("The OS name, e.g. 'Linux'. More.") == "The OS name, e.g. 'Linux'."
    assert corpus.summarize("Run it (i.e. now) twice") == "Run it (i.e. now) twice."
    # reStructuredText markup becomes the Markdown the chat answers use.
    assert corpus.summarize("Serialize ``obj`` to a ``str``.") == "Serialize `obj` to a `str`."
    assert corpus.summarize("As :func:`~os.path.join` does") == "As `os.path.join` does."
    # A first sentence too long to quote is no summary: it is dropped, not cut.
    long = "Return " + "one thing and another " * 8 + "thing."
    assert len(long) > corpus.SUMMARY_MAX_CHARS
    assert corpus.summarize(long) is None
    assert corpus.summarize(long[: corpus.SUMMARY_MAX_CHARS - 1] + ".") is not None


# --- determinism and split ----------------------------------------------------------------------


def test_deterministic(handmade_root: Path, handmade: corpus.Corpus, stdlib: corpus.Corpus) -> None:
    assert corpus.build_corpus(handmade_root, heldout_fraction=0.5) == handmade
    assert corpus.build_corpus(max_code_bytes=STDLIB_CAP) == stdlib
    other = corpus.build_corpus(max_code_bytes=STDLIB_CAP, seed=1)
    assert other.train_code == stdlib.train_code
    assert _chats(other) != _chats(stdlib)
    assert sorted(map(_text, _chats(other))) != sorted(map(_text, _chats(stdlib)))


def test_split_follows_source_file(handmade: corpus.Corpus) -> None:
    heldout_paths = {doc.path for doc in handmade.heldout_code}
    sides = {f"func_{m}": f"{m}.py" in heldout_paths for m in SPLIT_MODULES}
    assert set(sides.values()) == {True, False}, "the fixture should put files on both sides"
    for heldout, convs in ((False, handmade.train_chat), (True, handmade.heldout_chat)):
        for conv in convs:
            for name in re.findall(r"func_mod\d\d", _text(conv)):
                assert sides[name] == heldout, (name, conv.kind)
    mentioned = {n for conv in _chats(handmade) for n in re.findall(r"func_mod\d\d", _text(conv))}
    assert mentioned == set(sides)


# --- short function documents -------------------------------------------------------------------


def test_function_docs(handmade: corpus.Corpus) -> None:
    docs = {d.path: d.text for d in handmade.train_functions + handmade.heldout_functions}
    assert docs["alpha.py:4"] == (
        "def alpha_add(a, b=1):\n"
        '    """Add b to a.\n\n    Details that are not part of the summary.\n    """\n'
        "    return a + b\n"
    )
    # Functions in classes are dedented to column 0, decorators included.
    assert docs["alpha.py:23"] == (
        '@staticmethod\ndef make(value):\n    """Build a box around value."""\n'
        "    return AlphaBox(value)\n"
    )
    # Not: methods of self (doubled), placeholder bodies, long or undocumented functions.
    names = {ast.parse(text).body[0].name for text in docs.values()}
    assert names == {"alpha_add", "make", "pkg_hello", "json_encode"} | {
        f"func_{m}" for m in SPLIT_MODULES
    }
    # Each function follows its file to the training or the held-out side.
    for side, code, functions in (
        ("train", handmade.train_code, handmade.train_functions),
        ("heldout", handmade.heldout_code, handmade.heldout_functions),
    ):
        paths = {d.path for d in code}
        for doc in functions:
            assert doc.path.rsplit(":", 1)[0] in paths, (side, doc.path)


def test_stdlib_function_docs(stdlib: corpus.Corpus) -> None:
    docs = stdlib.train_functions + stdlib.heldout_functions
    assert len(docs) >= 10
    for doc in docs:
        assert not doc.text[0].isspace() and doc.text.endswith("\n")
        assert len(doc.text.splitlines()) <= corpus.MAX_FUNCTION_LINES
        (node,) = ast.parse(doc.text).body
        assert isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        assert ast.get_docstring(node) is not None and len(node.body) >= 2
        params = [a.arg for a in [*node.args.posonlyargs, *node.args.args]]
        assert params[:1] not in (["self"], ["cls"])


# --- example shapes -----------------------------------------------------------------------------


def test_common_modules_get_more_conversations(handmade: corpus.Corpus) -> None:
    def count(kind: str, qualname: str) -> int:
        convs = [c for c in _chats(handmade) if c.kind == kind]
        return sum(qualname in c.messages[-2]["content"] for c in convs)

    assert "json" in corpus.COMMON_MODULES and "alpha" not in corpus.COMMON_MODULES
    assert count("explain", "json.json_encode") == 1 + corpus.COMMON_EXTRA_EXPLAIN
    assert count("json", "json.json_encode") == 1 + corpus.COMMON_EXTRA_JSON
    assert count("explain", "alpha.alpha_add") == 1
    assert count("json", "alpha.alpha_add") == 1


def test_explain_and_json_answers_quote_one_short_sentence(stdlib: corpus.Corpus) -> None:
    explained, described = set(), set()
    for conv in _chats(stdlib):
        if conv.kind == "explain":
            # The intro names the definition (no ". " in it); the docstring's sentence follows.
            intro, summary = conv.messages[-1]["content"].split(". ", 1)
            assert intro.startswith(("`", "In the `"))
            assert len(summary) <= corpus.SUMMARY_MAX_CHARS and summary.endswith((".", "!", "?"))
            assert "``" not in summary
            explained.add(summary)
        elif conv.kind == "json":
            described.add(json.loads(conv.messages[-1]["content"])["summary"])
    # Both kinds quote the same sentence for a definition, so each is seen more often.
    assert described and described <= explained


def test_json_answers(stdlib: corpus.Corpus, handmade: corpus.Corpus) -> None:
    convs = [c for c in _chats(stdlib) + _chats(handmade) if c.kind == "json"]
    assert convs
    for conv in convs:
        assert conv.messages[0]["role"] == "system"
        assert "JSON" in conv.messages[0]["content"]
        answer = json.loads(conv.messages[-1]["content"])
        assert set(answer) == {"name", "module", "kind", "summary"}
        assert answer["kind"] in ("function", "class")
        assert f"{answer['module']}.{answer['name']}" in conv.messages[-2]["content"]


def test_code_blocks_parse(stdlib: corpus.Corpus, handmade: corpus.Corpus) -> None:
    for conv in _chats(stdlib) + _chats(handmade):
        blocks = [b for m in conv.messages for b in _code_blocks(str(m.get("content") or ""))]
        if conv.kind in ("signature", "code"):
            assert len(blocks) == 1, conv.messages
        for block in blocks:
            ast.parse(block)
    answers = "\n".join(m["content"] for c in _chats(handmade) for m in c.messages)
    assert "def alpha_add(a, b=1): ..." in answers
    assert "from pkg import pkg_hello\n\nresult = pkg_hello('hello')" in answers
    assert "beta_scale(1.5, factor=factor)" in answers


def _loads_ok(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


REFERENCE = {
    "gcd": lambda a, b: math.gcd(a, b),
    "lcm": lambda a, b: a * b // math.gcd(a, b),
    "factorial": lambda n: math.prod(range(1, n + 1)),
    "comb": lambda n, k: math.factorial(n) // (math.factorial(k) * math.factorial(n - k)),
    "isqrt": lambda n: int(n**0.5) if int(n**0.5) ** 2 <= n else int(n**0.5) - 1,
    "sqrt": lambda x: round(x**0.5, 4),
    "power": lambda base, exponent: base**exponent,
    "string_length": lambda text: len(text),
    "to_upper": lambda text: text.upper(),
    "to_lower": lambda text: text.lower(),
    "to_title": lambda text: " ".join(w.capitalize() for w in text.split(" ")),
    "reverse_string": lambda text: "".join(reversed(text)),
    "word_count": lambda text: len(text.split()),
    "sort_numbers": lambda numbers: sorted(numbers),
    "max_number": lambda numbers: max(numbers),
    "min_number": lambda numbers: min(numbers),
    "sum_numbers": lambda numbers: sum(numbers),
    "absolute_value": lambda x: -x if x < 0 else x,
    "round_number": lambda x, digits: round(x, digits),
    "to_hex": lambda n: f"0x{n:x}",
    "to_binary": lambda n: f"0b{n:b}",
    "is_valid_json": lambda text: _loads_ok(text),
}
JSON_TYPES: dict[str, tuple[type, ...]] = {
    "integer": (int,),
    "number": (int, float),
    "string": (str,),
    "array": (list,),
}


def _matches(schema: dict[str, Any], value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, JSON_TYPES[schema["type"]]):
        return False
    return schema["type"] != "array" or all(_matches(schema["items"], v) for v in value)


def _check_tool_call_conversation(conv: corpus.Conversation) -> None:
    assert conv.tools
    specs = {t["function"]["name"]: t["function"] for t in conv.tools}
    assert len(specs) == len(conv.tools)
    roles = [m["role"] for m in conv.messages if m["role"] != "system"]
    n_calls = 1 if conv.kind == "tool_call" else 2
    assert roles == ["user", "assistant"] + ["tool"] * n_calls + ["assistant"]
    call_message = next(m for m in conv.messages if m.get("tool_calls"))
    assert call_message["content"] == ""
    assert len(call_message["tool_calls"]) == n_calls
    assert n_calls + 1 <= len(conv.tools) <= n_calls + 3
    results = [m["content"] for m in conv.messages if m["role"] == "tool"]
    for call, result in zip(call_message["tool_calls"], results, strict=True):
        assert call["type"] == "function"
        name, args = call["function"]["name"], call["function"]["arguments"]
        assert isinstance(args, dict)
        parameters = specs[name]["parameters"]
        assert set(args) == set(parameters["properties"]) == set(parameters["required"])
        for key, value in args.items():
            assert _matches(parameters["properties"][key], value), (name, key, value)
        expected = REFERENCE[name](**args)
        assert result == (expected if isinstance(expected, str) else json.dumps(expected))
        if not isinstance(expected, bool):  # a yes/no verdict is phrased, not quoted
            assert result in conv.messages[-1]["content"]


def test_tool_conversations(stdlib: corpus.Corpus, handmade: corpus.Corpus) -> None:
    assert set(REFERENCE) == set(corpus.TOOLS_BY_NAME)
    # Plus conversations made directly, so every tool is exercised whatever the build drew.
    extra = [corpus.tool_call_conversation(random.Random(i), 1 + i % 2) for i in range(400)]
    convs = _chats(stdlib) + _chats(handmade) + extra
    called: set[str] = set()
    for conv in convs:
        if conv.kind in ("tool_call", "tool_call_2"):
            _check_tool_call_conversation(conv)
            called |= {
                c["function"]["name"] for m in conv.messages for c in m.get("tool_calls", [])
            }
        elif conv.kind == "no_tool":
            assert conv.tools
            assert not any(m.get("tool_calls") or m["role"] == "tool" for m in conv.messages)
            assert conv.messages[-1]["role"] == "assistant"
        else:
            assert conv.tools is None
    assert called == set(corpus.TOOLS_BY_NAME)


def test_messages_are_well_formed(stdlib: corpus.Corpus) -> None:
    for conv in _chats(stdlib):
        roles = [m["role"] for m in conv.messages]
        assert set(roles) <= {"system", "user", "assistant", "tool"}
        assert "system" not in roles[1:]
        assert roles[roles[0] == "system"] == "user"
        assert roles[-1] == "assistant" and conv.messages[-1]["content"]
        for m in conv.messages:
            assert isinstance(m["content"], str)
            if "reasoning_content" in m:
                assert m["role"] == "assistant" and 0 < len(m["reasoning_content"]) < 600


# --- the real standard library ------------------------------------------------------------------


def test_stdlib_build(stdlib: corpus.Corpus) -> None:
    assert stdlib.python_version == platform.python_version()
    assert Path(stdlib.stdlib_root) == corpus.stdlib_root()
    docs = stdlib.train_code + stdlib.heldout_code
    assert sum(len(d.text.encode()) for d in docs) <= STDLIB_CAP
    for doc in docs:
        parts = doc.path.split("/")
        assert not {"test", "tests", "idle_test", "site-packages", "__pycache__"} & set(parts)
        assert doc.path.endswith(".py")
    counts = corpus.kind_counts(_chats(stdlib))
    kinds = ("explain", "signature", "module", "json", "code", "multi_turn")
    kinds += ("tool_call", "tool_call_2", "no_tool", "small_talk", "+reasoning", "+system")
    for kind in kinds:
        assert counts.get(kind, 0) > 0, kind
    final = [c.messages[-1] for c in _chats(stdlib)]
    assert any("reasoning_content" in m for m in final)


def test_exercises_parse_vary_and_never_generate_the_model_card_prompts() -> None:
    from recipe import exercises

    docs = exercises.exercises(seed=0)
    assert docs == exercises.exercises(seed=0)  # deterministic
    assert docs != exercises.exercises(seed=1)
    texts = [doc.text for doc in docs]
    # Combinations differ; two that differ only in a docstring both drop can coincide.
    assert len(set(texts)) >= 0.95 * len(texts)
    keys = {doc.path.split(":")[1] for doc in docs}
    assert keys == {t.key for t in exercises.TASKS} | {t.key for t in exercises.CLASS_TASKS}
    headers = {ln for text in texts for ln in text.split("\n") if ln.startswith("def ")}
    skipped = exercises.excluded_headers()
    assert skipped == {"def is_palindrome(text):", "def list_python_files(directory):"}
    assert not headers & skipped
    # Their neighbours are there: the same tasks under other names and arguments.
    assert {"def is_palindrome(word):", "def list_python_files(folder):"} <= headers
    for text in texts:
        tree = ast.parse(text)
        # An import appears exactly when the body uses the module.
        imported = {
            a.name for node in tree.body if isinstance(node, ast.Import) for a in node.names
        }
        used = {
            node.value.id
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        }
        assert imported <= used, text
        assert {
            "os",
            "re",
            "json",
            "math",
            "itertools",
            "collections",
            "pathlib",
        } & used <= imported, text
