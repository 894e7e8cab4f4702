"""Small, idiomatic Python functions generated from templates written for this recipe.

The standard library teaches the model Python's vocabulary, but its functions are long and
about their own modules' internals; a 10M-parameter model that learns only from them answers
"def is_palindrome(text):" with stdlib-flavoured noise. These exercises are the everyday
shape a completion prompt asks for: a header, a docstring, and a short body that uses the
arguments and returns, then the end of the text.

Each task has several names, argument names, docstring wordings and implementations, and a
document is one combination of them, so the model sees the same idea in many surface forms.
The headers of the model card's code prompts (recipe.evaluate.PROMPTS) are never generated:
those exact prompts stay unseen, and only their neighbours with other names are trained on.
All text here is original to this project (same licence as the repository).
"""

from __future__ import annotations

import ast
import itertools
import random
from dataclasses import dataclass
from string import Template

from recipe.corpus import CodeDoc


@dataclass(frozen=True)
class Task:
    key: str
    names: tuple[str, ...]
    # Argument names, one mapping per variant: $a, $b, ... in the header, docstrings and bodies.
    args: tuple[dict[str, str], ...]
    header: str  # "$name($a, $b)"
    docs: tuple[str, ...]
    bodies: tuple[str, ...]  # at column 0; indented when the document is assembled
    imports: str = ""  # e.g. "import os"; put at the top of the document


def _args(*variants: str) -> tuple[dict[str, str], ...]:
    """ "text", "s, n" -> [{"a": "text"}, {"a": "s", "b": "n"}]."""
    keys = "abcd"
    return tuple(
        dict(zip(keys, (part.strip() for part in v.split(",")), strict=False)) for v in variants
    )


TEXT = _args("text", "s", "word", "string", "value")
ITEMS = _args("items", "values", "seq", "elements", "data")
NUMBERS = _args("numbers", "values", "nums", "data")
PATH = _args("path", "filename", "file_path", "name")
DIRECTORY = _args("directory", "path", "root", "folder")

TASKS: tuple[Task, ...] = (
    Task(
        "palindrome",
        ("is_palindrome", "check_palindrome", "reads_same_backwards", "palindrome"),
        TEXT,
        "$name($a)",
        (
            "Return True if $a reads the same backwards.",
            "Return True if $a is a palindrome.",
            "Check whether $a is the same forwards and backwards.",
        ),
        (
            "return $a == $a[::-1]",
            "cleaned = $a.lower()\nreturn cleaned == cleaned[::-1]",
            "return $a == ''.join(reversed($a))",
            "for i in range(len($a) // 2):\n    if $a[i] != $a[-1 - i]:\n        return False\n"
            "return True",
        ),
    ),
    Task(
        "reverse",
        ("reverse", "reverse_string", "reversed_text", "backwards"),
        TEXT,
        "$name($a)",
        ("Return $a reversed.", "Return the characters of $a in reverse order."),
        ("return $a[::-1]", "return ''.join(reversed($a))"),
    ),
    Task(
        "vowels",
        ("count_vowels", "vowel_count", "number_of_vowels"),
        TEXT,
        "$name($a)",
        ("Return the number of vowels in $a.", "Count the vowels in $a."),
        (
            "return sum(1 for char in $a.lower() if char in 'aeiou')",
            "count = 0\nfor char in $a.lower():\n    if char in 'aeiou':\n        count += 1\n"
            "return count",
        ),
    ),
    Task(
        "words",
        ("count_words", "word_count", "number_of_words"),
        TEXT,
        "$name($a)",
        ("Return the number of words in $a.", "Count the whitespace-separated words in $a."),
        ("return len($a.split())",),
    ),
    Task(
        "title",
        ("capitalize_words", "title_case", "capitalize_all"),
        TEXT,
        "$name($a)",
        ("Return $a with every word capitalized.", "Capitalize each word of $a."),
        (
            "return ' '.join(word.capitalize() for word in $a.split())",
            "words = [word.capitalize() for word in $a.split()]\nreturn ' '.join(words)",
        ),
    ),
    Task(
        "anagram",
        ("is_anagram", "are_anagrams", "check_anagram"),
        _args("first, second", "a, b", "word1, word2", "s, t"),
        "$name($a, $b)",
        (
            "Return True if $a and $b are anagrams of each other.",
            "Check whether $a and $b contain the same letters.",
        ),
        (
            "return sorted($a) == sorted($b)",
            "return collections.Counter($a) == collections.Counter($b)",
        ),
        "import collections",
    ),
    Task(
        "char_counts",
        ("char_frequency", "count_characters", "letter_counts"),
        TEXT,
        "$name($a)",
        (
            "Return a dict mapping each character of $a to its count.",
            "Count how often each character occurs in $a.",
        ),
        (
            "counts = {}\nfor char in $a:\n    counts[char] = counts.get(char, 0) + 1\n"
            "return counts",
            "return dict(collections.Counter($a))",
        ),
        "import collections",
    ),
    Task(
        "truncate",
        ("truncate", "shorten", "clip_text"),
        _args("text, width", "s, limit", "text, max_length"),
        "$name($a, $b)",
        (
            "Return $a cut to at most $b characters, ending in '...' if it was cut.",
            "Shorten $a to $b characters.",
        ),
        ("if len($a) <= $b:\n    return $a\nreturn $a[: $b - 3] + '...'",),
    ),
    Task(
        "squeeze",
        ("remove_whitespace", "strip_spaces", "squeeze"),
        TEXT,
        "$name($a)",
        ("Return $a without any whitespace.", "Remove all whitespace from $a."),
        ("return ''.join($a.split())", "return re.sub(r'\\s+', '', $a)"),
        "import re",
    ),
    Task(
        "mean",
        ("mean", "average", "arithmetic_mean"),
        NUMBERS,
        "$name($a)",
        (
            "Return the arithmetic mean of $a.",
            "Return the average of the numbers in $a.",
        ),
        (
            "if not $a:\n    raise ValueError('mean of empty data')\nreturn sum($a) / len($a)",
            "return sum($a) / len($a)",
        ),
    ),
    Task(
        "median",
        ("median", "middle_value"),
        NUMBERS,
        "$name($a)",
        ("Return the median of $a.", "Return the middle value of $a."),
        (
            "ordered = sorted($a)\nmiddle = len(ordered) // 2\nif len(ordered) % 2:\n"
            "    return ordered[middle]\nreturn (ordered[middle - 1] + ordered[middle]) / 2",
        ),
    ),
    Task(
        "largest",
        ("largest", "find_max", "maximum"),
        ITEMS,
        "$name($a)",
        ("Return the largest item of $a.", "Return the maximum of $a."),
        (
            "largest = $a[0]\nfor item in $a[1:]:\n    if item > largest:\n        largest = item\n"
            "return largest",
            "return max($a)",
        ),
    ),
    Task(
        "smallest",
        ("smallest", "find_min", "minimum"),
        ITEMS,
        "$name($a)",
        ("Return the smallest item of $a.", "Return the minimum of $a."),
        (
            "smallest = $a[0]\nfor item in $a[1:]:\n    if item < smallest:\n"
            "        smallest = item\nreturn smallest",
            "return min($a)",
        ),
    ),
    Task(
        "squares",
        ("sum_of_squares", "square_sum"),
        NUMBERS,
        "$name($a)",
        ("Return the sum of the squares of $a.",),
        (
            "return sum(x * x for x in $a)",
            "total = 0\nfor x in $a:\n    total += x * x\nreturn total",
        ),
    ),
    Task(
        "evens",
        ("even_numbers", "only_even", "filter_even"),
        NUMBERS,
        "$name($a)",
        ("Return the even numbers in $a.", "Return a list of the even items of $a."),
        (
            "return [n for n in $a if n % 2 == 0]",
            "result = []\nfor n in $a:\n    if n % 2 == 0:\n        result.append(n)\nreturn result",
        ),
    ),
    Task(
        "flatten",
        ("flatten", "flatten_list", "concat_lists"),
        _args("lists", "nested", "rows"),
        "$name($a)",
        ("Return the items of the lists in $a as one list.", "Flatten $a by one level."),
        (
            "return [item for sublist in $a for item in sublist]",
            "return list(itertools.chain.from_iterable($a))",
            "result = []\nfor sublist in $a:\n    result.extend(sublist)\nreturn result",
        ),
        "import itertools",
    ),
    Task(
        "unique",
        ("unique", "dedupe", "remove_duplicates"),
        ITEMS,
        "$name($a)",
        (
            "Return the items of $a without duplicates, keeping their order.",
            "Remove repeated items from $a, keeping the first of each.",
        ),
        (
            "seen = set()\nresult = []\nfor item in $a:\n    if item not in seen:\n"
            "        seen.add(item)\n        result.append(item)\nreturn result",
            "return list(dict.fromkeys($a))",
        ),
    ),
    Task(
        "chunks",
        ("chunks", "split_into_chunks", "batched"),
        _args("items, size", "seq, n", "values, length"),
        "$name($a, $b)",
        ("Split $a into lists of $b items.", "Return $a in chunks of $b."),
        ("return [$a[i : i + $b] for i in range(0, len($a), $b)]",),
    ),
    Task(
        "factorial",
        ("factorial", "fact"),
        _args("n", "number", "k"),
        "$name($a)",
        ("Return $a factorial.", "Return the product of the integers from 1 to $a."),
        (
            "result = 1\nfor i in range(2, $a + 1):\n    result *= i\nreturn result",
            "if $a <= 1:\n    return 1\nreturn $a * $name($a - 1)",
            "return math.prod(range(1, $a + 1))",
        ),
        "import math",
    ),
    Task(
        "fibonacci",
        ("fibonacci", "fib", "nth_fibonacci"),
        _args("n", "index", "k"),
        "$name($a)",
        ("Return the $a-th Fibonacci number.", "Return Fibonacci number $a, counting from 0."),
        (
            "a, b = 0, 1\nfor _ in range($a):\n    a, b = b, a + b\nreturn a",
            "if $a < 2:\n    return $a\nreturn $name($a - 1) + $name($a - 2)",
        ),
    ),
    Task(
        "prime",
        ("is_prime", "check_prime", "prime"),
        _args("n", "number", "value"),
        "$name($a)",
        ("Return True if $a is a prime number.", "Check whether $a is prime."),
        (
            "if $a < 2:\n    return False\nfor i in range(2, int($a ** 0.5) + 1):\n"
            "    if $a % i == 0:\n        return False\nreturn True",
        ),
    ),
    Task(
        "gcd",
        ("gcd", "greatest_common_divisor"),
        _args("a, b", "x, y", "m, n"),
        "$name($a, $b)",
        ("Return the greatest common divisor of $a and $b.",),
        ("while $b:\n    $a, $b = $b, $a % $b\nreturn $a", "return math.gcd($a, $b)"),
        "import math",
    ),
    Task(
        "clamp",
        ("clamp", "bound", "limit"),
        _args("value, low, high", "x, lower, upper", "n, minimum, maximum"),
        "$name($a, $b, $c)",
        ("Return $a limited to the range from $b to $c.", "Clamp $a between $b and $c."),
        ("return max($b, min($a, $c))",),
    ),
    Task(
        "cumulative",
        ("running_total", "cumulative_sum", "prefix_sums"),
        NUMBERS,
        "$name($a)",
        ("Return the running totals of $a.", "Return the cumulative sums of $a."),
        (
            "total = 0\nresult = []\nfor x in $a:\n    total += x\n    result.append(total)\n"
            "return result",
            "return list(itertools.accumulate($a))",
        ),
        "import itertools",
    ),
    Task(
        "count_of",
        ("count_occurrences", "count_of", "how_many"),
        _args("items, target", "seq, value", "values, item"),
        "$name($a, $b)",
        ("Return how many times $b occurs in $a.", "Count the items of $a equal to $b."),
        ("return sum(1 for x in $a if x == $b)", "return $a.count($b)"),
    ),
    Task(
        "first_index",
        ("find_index", "index_of", "position"),
        _args("items, target", "seq, value", "values, item"),
        "$name($a, $b)",
        ("Return the index of $b in $a, or -1 if it is missing.",),
        ("for i, x in enumerate($a):\n    if x == $b:\n        return i\nreturn -1",),
    ),
    Task(
        "merge",
        ("merge_dicts", "combine", "merged"),
        _args("first, second", "a, b", "defaults, overrides"),
        "$name($a, $b)",
        ("Return a new dict with the keys of $a and $b; $b wins on conflicts.",),
        ("result = dict($a)\nresult.update($b)\nreturn result", "return {**$a, **$b}"),
    ),
    Task(
        "invert",
        ("invert_dict", "reverse_mapping", "swap_keys_and_values"),
        _args("mapping", "d", "table"),
        "$name($a)",
        ("Return a dict mapping each value of $a to its key.",),
        ("return {value: key for key, value in $a.items()}",),
    ),
    Task(
        "by_length",
        ("sort_by_length", "shortest_first"),
        _args("words", "strings", "names"),
        "$name($a)",
        ("Return $a sorted from shortest to longest.",),
        ("return sorted($a, key=len)",),
    ),
    Task(
        "most_common",
        ("most_common_word", "top_word", "frequent_word"),
        TEXT,
        "$name($a)",
        ("Return the word that occurs most often in $a.",),
        ("counts = collections.Counter($a.lower().split())\nreturn counts.most_common(1)[0][0]",),
        "import collections",
    ),
    Task(
        "celsius",
        ("celsius_to_fahrenheit", "to_fahrenheit"),
        _args("celsius", "degrees", "temperature"),
        "$name($a)",
        ("Convert $a from degrees Celsius to Fahrenheit.",),
        ("return $a * 9 / 5 + 32",),
    ),
    Task(
        "python_files",
        ("list_python_files", "python_files", "find_python_files", "list_py_files"),
        DIRECTORY,
        "$name($a)",
        (
            "Return the paths of the .py files in $a.",
            "Return the names of the Python files in $a.",
            "List the Python source files under $a.",
        ),
        (
            "return [name for name in os.listdir($a) if name.endswith('.py')]",
            "paths = []\nfor name in sorted(os.listdir($a)):\n    if name.endswith('.py'):\n"
            "        paths.append(os.path.join($a, name))\nreturn paths",
            "result = []\nfor dirpath, dirnames, filenames in os.walk($a):\n"
            "    for filename in filenames:\n        if filename.endswith('.py'):\n"
            "            result.append(os.path.join(dirpath, filename))\nreturn result",
        ),
        "import os",
    ),
    Task(
        "files_with_suffix",
        ("files_with_extension", "find_files", "list_files"),
        _args("directory, suffix", "root, extension", "path, ext"),
        "$name($a, $b)",
        ("Return the files in $a whose names end with $b.",),
        (
            "return [name for name in os.listdir($a) if name.endswith($b)]",
            "return sorted(str(p) for p in pathlib.Path($a).glob('*' + $b))",
        ),
        "import os\nimport pathlib",
    ),
    Task(
        "read_lines",
        ("read_lines", "load_lines", "lines_of"),
        PATH,
        "$name($a)",
        ("Return the lines of the file at $a.", "Read $a and return its lines."),
        (
            "with open($a) as f:\n    return f.read().splitlines()",
            "with open($a, encoding='utf-8') as f:\n    return [line.rstrip('\\n') for line in f]",
        ),
    ),
    Task(
        "count_lines",
        ("count_lines", "line_count"),
        PATH,
        "$name($a)",
        ("Return the number of lines in the file at $a.",),
        ("with open($a) as f:\n    return sum(1 for _ in f)",),
    ),
    Task(
        "write_text",
        ("write_text", "save_text", "write_file"),
        _args("path, text", "filename, content", "path, data"),
        "$name($a, $b)",
        ("Write $b to the file at $a.", "Save $b in $a, replacing what was there."),
        ("with open($a, 'w') as f:\n    f.write($b)",),
    ),
    Task(
        "load_json",
        ("load_json", "read_json"),
        PATH,
        "$name($a)",
        ("Return the JSON document stored in $a.", "Load and return the JSON file $a."),
        ("with open($a) as f:\n    return json.load(f)",),
        "import json",
    ),
    Task(
        "save_json",
        ("save_json", "write_json", "dump_json"),
        _args("path, data", "filename, obj", "path, value"),
        "$name($a, $b)",
        ("Write $b to $a as JSON.",),
        ("with open($a, 'w') as f:\n    json.dump($b, f, indent=2)",),
        "import json",
    ),
    Task(
        "is_json",
        ("is_valid_json", "is_json", "valid_json"),
        TEXT,
        "$name($a)",
        ("Return True if $a is a valid JSON document.",),
        ("try:\n    json.loads($a)\nexcept ValueError:\n    return False\nreturn True",),
        "import json",
    ),
    Task(
        "size",
        ("file_size", "size_of", "get_size"),
        PATH,
        "$name($a)",
        ("Return the size of the file at $a in bytes.",),
        ("return os.path.getsize($a)", "return os.stat($a).st_size"),
        "import os",
    ),
    Task(
        "extension",
        ("file_extension", "get_extension", "suffix_of"),
        PATH,
        "$name($a)",
        ("Return the extension of $a, such as '.py'.",),
        ("return os.path.splitext($a)[1]",),
        "import os",
    ),
    Task(
        "makedirs",
        ("ensure_directory", "make_dir", "ensure_dir"),
        DIRECTORY,
        "$name($a)",
        ("Create $a if it does not exist, and return it.",),
        ("os.makedirs($a, exist_ok=True)\nreturn $a",),
        "import os",
    ),
    Task(
        "numbers_in",
        ("extract_numbers", "find_numbers", "integers_in"),
        TEXT,
        "$name($a)",
        ("Return the integers that appear in $a.",),
        ("return [int(match) for match in re.findall(r'\\d+', $a)]",),
        "import re",
    ),
    Task(
        "slugify",
        ("slugify", "make_slug", "to_slug"),
        TEXT,
        "$name($a)",
        ("Return $a in lower case with runs of other characters replaced by '-'.",),
        ("$a = re.sub(r'[^a-z0-9]+', '-', $a.lower())\nreturn $a.strip('-')",),
        "import re",
    ),
)


@dataclass(frozen=True)
class ClassTask:
    key: str
    names: tuple[str, ...]
    docs: tuple[str, ...]
    body: str  # methods at column 0, indented once when assembled
    imports: str = ""


CLASS_TASKS: tuple[ClassTask, ...] = (
    ClassTask(
        "stack",
        ("Stack", "LifoStack"),
        ("A last-in, first-out stack.", "A stack of items."),
        "def __init__(self):\n    self._items = []\n\n"
        "def push(self, item):\n    self._items.append(item)\n\n"
        "def pop(self):\n    return self._items.pop()\n\n"
        "def peek(self):\n    return self._items[-1]\n\n"
        "def __len__(self):\n    return len(self._items)",
    ),
    ClassTask(
        "queue",
        ("Queue", "FifoQueue"),
        ("A first-in, first-out queue.", "A queue of items."),
        "def __init__(self):\n    self._items = collections.deque()\n\n"
        "def put(self, item):\n    self._items.append(item)\n\n"
        "def get(self):\n    return self._items.popleft()\n\n"
        "def empty(self):\n    return not self._items",
        "import collections",
    ),
    ClassTask(
        "point",
        ("Point", "Vector2"),
        ("A point in the plane.", "A two-dimensional point."),
        "def __init__(self, x, y):\n    self.x = x\n    self.y = y\n\n"
        "def distance_to(self, other):\n"
        "    return math.hypot(self.x - other.x, self.y - other.y)\n\n"
        "def __repr__(self):\n    return f'{type(self).__name__}({self.x!r}, {self.y!r})'",
        "import math",
    ),
    ClassTask(
        "counter",
        ("Counter", "Tally"),
        ("Count how many times each key is added.",),
        "def __init__(self):\n    self.counts = {}\n\n"
        "def add(self, key):\n    self.counts[key] = self.counts.get(key, 0) + 1\n\n"
        "def most_common(self):\n    return max(self.counts, key=self.counts.get)",
    ),
)


def _indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line if line else line for line in text.split("\n"))


def _imports_used(imports: str, body: str) -> str:
    """The import lines whose module the body mentions."""
    lines = [line for line in imports.split("\n") if line]
    return "\n".join(line for line in lines if line.split()[-1] + "." in body)


def function_text(task: Task, name: str, args: dict[str, str], doc: str | None, body: str) -> str:
    values = {"name": name, **args}
    header = "def " + Template(task.header).substitute(values) + ":"
    code = Template(body).substitute(values)
    text = header + "\n"
    if doc is not None:
        text += _indent(f'"""{Template(doc).substitute(values)}"""') + "\n"
    text += _indent(code) + "\n"
    imports = _imports_used(task.imports, code)
    return f"{imports}\n\n\n{text}" if imports else text


def class_text(task: ClassTask, name: str, doc: str) -> str:
    text = f'class {name}:\n    """{doc}"""\n\n{_indent(task.body)}\n'
    imports = _imports_used(task.imports, task.body)
    return f"{imports}\n\n\n{text}" if imports else text


def excluded_headers() -> set[str]:
    """The def lines of the model card's code prompts, never generated."""
    from recipe.evaluate import PROMPTS

    headers = set()
    for item in PROMPTS:
        if item["kind"] == "code":
            headers |= {ln for ln in item["prompt"].split("\n") if ln.startswith("def ")}
    return headers


NO_DOCSTRING_SHARE = 0.2


def exercises(seed: int, per_task: int = 96) -> list[CodeDoc]:
    """Up to `per_task` distinct documents per task (fewer where the task has fewer
    combinations), in a fixed order for a given seed."""
    rng = random.Random(f"{seed}:exercises")
    skip = excluded_headers()
    docs: list[CodeDoc] = []
    for task in TASKS:
        combos = list(itertools.product(task.names, task.args, task.docs, task.bodies))
        rng.shuffle(combos)
        kept = 0
        for name, args, doc, body in combos:
            if kept == per_task:
                break
            header = "def " + Template(task.header).substitute(name=name, **args) + ":"
            if header in skip:
                continue
            text = function_text(
                task, name, args, None if rng.random() < NO_DOCSTRING_SHARE else doc, body
            )
            docs.append(CodeDoc(f"exercise:{task.key}:{kept}", text))
            kept += 1
    for task in CLASS_TASKS:
        for i, (name, doc) in enumerate(itertools.product(task.names, task.docs)):
            docs.append(CodeDoc(f"exercise:{task.key}:{i}", class_text(task, name, doc)))
    for doc in docs:
        ast.parse(doc.text)  # a template typo fails the build, not the model
    return docs
