"""The chat template and special tokens of bisllm-tiny-moe, following Qwen3's conventions.

ChatML turns (`<|im_start|>role\\n…<|im_end|>\\n`); tools listed as JSON lines inside
`<tools></tools>` in the system turn; calls as `<tool_call>\\n{"name": …, "arguments": …}\\n
</tool_call>` in the assistant turn; tool results in a user turn, each wrapped in
`<tool_response>…</tool_response>` (consecutive results share one turn); reasoning in a
`<think>…</think>` block at the start of an assistant turn, kept only for the turns after the
last user message; `enable_thinking=False` pre-fills an empty think block in the generation
prompt. So the Qwen-style tool-call and reasoning parsers serve this model unchanged.
"""

from __future__ import annotations

END_OF_TEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Special: never produced by encoding user text, and skipped when decoding for display.
SPECIAL_TOKENS = [END_OF_TEXT, IM_START, IM_END]
# Added but not special: they stay in decoded text, where the parsers look for them.
MARKUP_TOKENS = [
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
]
EMPTY_THINK = "<think>\n\n</think>\n\n"
ASSISTANT_HEADER = IM_START + "assistant\n"

TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_POSTAMBLE = (
    "</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)

# Written for transformers' renderer (its `tojson` keeps non-ASCII and does not escape <, >;
# it trims the newline right after a block tag, so such newlines are emitted as {{ NL }}).
_NL = "{{ '\\n' }}"
CHAT_TEMPLATE = "".join(
    [
        "{% set ns = namespace(last_user=-1) %}",
        "{% for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}",
        "{% endif %}{% endfor %}",
        "{% set has_system = messages | length > 0 and messages[0].role == 'system' %}",
        # System turn: the system message, then the tools block when tools are given.
        "{% if tools %}<|im_start|>system\n",
        "{% if has_system %}{{ messages[0].content }}",
        _NL,
        _NL,
        "{% endif %}",
        TOOLS_PREAMBLE,
        "{% for tool in tools %}",
        _NL,
        "{{ tool | tojson }}{% endfor %}",
        _NL,
        TOOLS_POSTAMBLE,
        "<|im_end|>",
        _NL,
        "{% elif has_system %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>",
        _NL,
        "{% endif %}",
        "{% for m in messages %}",
        "{% if m.role == 'user' %}<|im_start|>user\n{{ m.content }}<|im_end|>",
        _NL,
        "{% elif m.role == 'assistant' %}<|im_start|>assistant\n",
        # Reasoning is kept only after the last user message, as Qwen3 does.
        "{% if m.reasoning_content and loop.index0 > ns.last_user %}<think>\n",
        "{{ m.reasoning_content }}\n</think>",
        _NL,
        _NL,
        "{% endif %}",
        "{% if m.content %}{{ m.content }}{% endif %}",
        "{% for call in m.tool_calls or [] %}",
        "{% set fn = call.function if call.function is defined else call %}",
        "{% if not loop.first or m.content %}",
        _NL,
        "{% endif %}",
        '<tool_call>\n{"name": "{{ fn.name }}", "arguments": ',
        "{% if fn.arguments is string %}{{ fn.arguments }}{% else %}{{ fn.arguments | tojson }}",
        "{% endif %}}",
        _NL,
        "</tool_call>",
        "{% endfor %}<|im_end|>",
        _NL,
        # Consecutive tool results share one user turn.
        "{% elif m.role == 'tool' %}",
        "{% if loop.first or messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user",
        "{% endif %}",
        _NL,
        "<tool_response>\n{{ m.content }}\n</tool_response>",
        "{% if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>",
        _NL,
        "{% endif %}",
        "{% endif %}{% endfor %}",
        "{% if add_generation_prompt %}<|im_start|>assistant\n",
        "{% if enable_thinking is defined and enable_thinking is false %}<think>",
        _NL,
        _NL,
        "</think>",
        _NL,
        _NL,
        "{% endif %}{% endif %}",
    ]
)
