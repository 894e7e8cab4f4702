"""Migrate an Engine-Builder-LLM (v1) ``config.yaml`` to BIS-LLM (v2).

The migration is the documented seven-step recipe (see the product spec, section 3) plus the
autoscaling switch from request concurrency to in-flight tokens. It edits the YAML in round-trip
mode (see ``yaml_roundtrip``) so the user's comments, key order, quoting and number spelling
survive; anything that cannot be translated mechanically is reported as a warning instead of
being guessed.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError

from bisllm_truss.schema.llm_config import MAX_DRAFT_LEN
from bisllm_truss.schema.trt_llm import (
    LEGACY_QUANTIZATION,
    V2_ALLOWED_BUILD_FIELDS,
    V2_MAX_NUM_TOKENS,
    V2_QUANTIZATION_NAMES,
    BuildV1,
    RuntimeV1,
    RuntimeV2,
)
from bisllm_truss.yaml_roundtrip import (
    Entry,
    Indent,
    Parent,
    add_eol_comment,
    block_column,
    comments_above,
    detect_indent,
    dump,
    insert_after,
    insert_first,
    is_null,
    is_number,
    make_yaml,
    remove_key,
    rename_key,
    scalar_text,
    take_key,
    to_block,
)

__all__ = ["Migration", "MigrationError", "migrate_text"]

_MARK = "bisllm migrate:"

# Steps 3 and 4: build fields that move to trt_llm.runtime, by their v2 name.
_BUILD_TO_RUNTIME = {
    "max_seq_len": "max_seq_len",
    "max_batch_size": "max_batch_size",
    "max_num_tokens": "max_num_tokens",
    "tensor_parallel_count": "tensor_parallel_size",
}
# Build fields the seven steps handle explicitly (deleted or moved).
_STEP_BUILD_FIELDS = {"base_model", "plugin_configuration", "speculator", *_BUILD_TO_RUNTIME}
# The rest of the v1 build fields have no v2 home; with their v1 defaults, since only a
# non-default value means intent is lost. Derived from the schema, the single source of truth.
_V1_ONLY_BUILD_DEFAULTS: dict[str, Any] = {
    name: info.get_default(call_default_factory=True)
    for name, info in BuildV1.model_fields.items()
    if name not in V2_ALLOWED_BUILD_FIELDS and name not in _STEP_BUILD_FIELDS
}
_LEGACY_QUANT = frozenset(q.value for q in LEGACY_QUANTIZATION)
# v1 runtime fields v2 does not know (step 7 renames enable_chunked_context instead).
_V1_ONLY_RUNTIME = (
    frozenset(RuntimeV1.model_fields) - set(RuntimeV2.model_fields) - {"enable_chunked_context"}
)


class MigrationError(Exception):
    """The input cannot be migrated at all (bad YAML, or not a trt_llm v1/v2 config)."""


@dataclass(frozen=True)
class Migration:
    """The outcome of ``migrate_text``: both texts and what needs a human's attention."""

    original: str
    migrated: str
    changed: bool
    warnings: list[str] = field(default_factory=list)

    def diff(self, fromfile: str = "a/config.yaml", tofile: str = "b/config.yaml") -> str:
        if not self.changed:
            return ""
        lines = difflib.unified_diff(
            self.original.splitlines(keepends=True),
            self.migrated.splitlines(keepends=True),
            fromfile=fromfile,
            tofile=tofile,
        )
        # difflib glues a last line without "\n" onto the next one; mark it the way diff(1) does.
        return "".join(
            ln if ln.endswith("\n") else ln + "\n\\ No newline at end of file\n" for ln in lines
        )


def _is_v1_default(value: Any, default: Any) -> bool:
    if default is None:
        return is_null(value) or (isinstance(value, (dict, list)) and not value)
    return not isinstance(value, (dict, list, str)) and value == default


def _lookahead_draft_len(spec: CommentedMap) -> tuple[int | None, str]:
    """max_draft_len for a lookahead speculator, and a note on where it came from."""
    draft = spec.get("num_draft_tokens")
    if is_number(draft) and draft >= 1:
        return _capped(int(draft), f"num_draft_tokens {draft}")
    window = spec.get("lookahead_windows_size")
    ngram = spec.get("lookahead_ngram_size")
    verify = spec.get("lookahead_verification_set_size")
    if not all(is_number(v) and v >= 1 for v in (window, ngram, verify)):
        return None, "lookahead sizes missing"
    n = (0 if ngram == 1 else ngram - 2) + (window - 1 + verify) * (ngram - 1)
    note = f"lookahead window {window}, ngram {ngram}, verification set {verify}"
    if n < 1:  # ngram 1 drafts nothing, so there is no draft length to carry over
        return None, note
    return _capped(int(n), note)


def _capped(draft_len: int, note: str) -> tuple[int, str]:
    """Lookahead could draft up to 2048 tokens; v2's speculative_config allows MAX_DRAFT_LEN."""
    if draft_len <= MAX_DRAFT_LEN:
        return draft_len, note
    return MAX_DRAFT_LEN, f"{note}; {draft_len} clamped to the v2 maximum {MAX_DRAFT_LEN}"


class _Migrator:
    def __init__(self, root: CommentedMap, text: str, indent: Indent, tokens: int) -> None:
        self.root = root
        self.lines = text.splitlines()
        self.trt: CommentedMap = root["trt_llm"]
        self.indent = indent
        self.tokens_per_request = tokens
        self.warnings: list[str] = []

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def remove_noted(self, parent: Parent, key: str, fallback_column: int, why: str) -> Any:
        """Remove key from the mapping at parent, leaving a comment line that says what it was."""
        m = parent[0][parent[1]]
        value = m[key]
        indent = " " * block_column(m, key, fallback_column)
        line = f"{indent}# {_MARK} removed {key}: {scalar_text(value)} ({why})\n"
        return remove_key(m, key, parent, placeholder=line)

    def run(self) -> None:
        self.inference_stack()
        runtime = self.trt.get("runtime")
        if not is_null(runtime) and not isinstance(runtime, CommentedMap):
            raise MigrationError("trt_llm.runtime must be a mapping")
        moved = self.build(runtime if isinstance(runtime, CommentedMap) else CommentedMap())
        self.runtime(moved)
        self.autoscaling()

    def inference_stack(self) -> None:  # step 1
        if "inference_stack" in self.trt:
            self.trt["inference_stack"] = "v2"  # in place, keeping any quoting style
        else:
            insert_first((self.root, "trt_llm"), [Entry("inference_stack", "v2")])

    def build(self, runtime: CommentedMap) -> list[Entry]:
        """Steps 2 to 6; returns the entries that move to trt_llm.runtime."""
        build = self.trt.get("build")
        if is_null(build):
            self.warn(
                "trt_llm.build: missing; v2 needs trt_llm.build.checkpoint_repository "
                "(or skip_build_result: true). Add it by hand."
            )
            return []
        if not isinstance(build, CommentedMap):
            raise MigrationError("trt_llm.build must be a mapping")
        parent = (self.trt, "build")
        moved: list[Entry] = []

        if "base_model" in build:  # step 2: the architecture comes from the checkpoint
            base = remove_key(build, "base_model", parent)
            if base != "decoder":
                self.warn(
                    f"trt_llm.build.base_model: was {scalar_text(base)}; BIS-LLM serves "
                    "decoder LLMs, so this model may belong on another engine."
                )

        for old, new in _BUILD_TO_RUNTIME.items():  # steps 3 and 4
            if old not in build:
                continue
            if new in runtime:
                value = remove_key(build, old, parent)
                self.warn(
                    f"trt_llm.build.{old}: trt_llm.runtime.{new} is already set "
                    f"({scalar_text(runtime[new])}) and was kept; the build value "
                    f"({scalar_text(value)}) was dropped."
                )
            else:
                above = comments_above(self.lines, build, old)
                moved.append(take_key(build, old, parent, new, above))

        if "plugin_configuration" in build:  # step 5: v2 handles paged KV / FMHA itself
            remove_key(build, "plugin_configuration", parent)

        if "speculator" in build:  # step 6
            self.speculator(remove_key(build, "speculator", parent))

        for key, default in _V1_ONLY_BUILD_DEFAULTS.items():
            if key not in build:
                continue
            value = remove_key(build, key, parent)
            if not _is_v1_default(value, default):
                self.warn(
                    f"trt_llm.build.{key}: removed; v2 has no equivalent, so the value "
                    f"{scalar_text(value)} (v1 default {scalar_text(default)}) is lost."
                )

        quant = build.get("quantization_type")
        if isinstance(quant, str) and quant in _LEGACY_QUANT:
            self.warn(
                f"trt_llm.build.quantization_type: {quant} is a legacy type that v2 does "
                f"not support; pick one of {V2_QUANTIZATION_NAMES}."
            )
        for key in build:
            if key not in V2_ALLOWED_BUILD_FIELDS:
                self.warn(
                    f"trt_llm.build.{key}: not a v2 build field; left in place (v2 rejects "
                    "it unless it has its default value)."
                )
        return moved

    def speculator(self, spec: Any) -> None:
        mode = spec.get("speculative_decoding_mode") if isinstance(spec, CommentedMap) else None
        if mode != "LOOKAHEAD_DECODING":
            self.warn(
                f"trt_llm.build.speculator: removed; mode {scalar_text(mode)} has no "
                "mechanical v2 equivalent. Configure llm_config.speculative_config "
                "(Eagle, MTP or NGram) by hand."
            )
            return
        draft_len, note = _lookahead_draft_len(spec)
        config = CommentedMap()
        config["decoding_type"] = "NGram"
        if draft_len is not None:
            config["max_draft_len"] = draft_len
        where = self.add_speculative_config(config, note)
        if where is None:
            return
        length = (
            f"max_draft_len {draft_len} (from {note})"
            if draft_len is not None
            else f"no max_draft_len ({note}; set one by hand)"
        )
        self.warn(
            f"trt_llm.build.speculator: lookahead decoding is not available on v2; replaced "
            f"by {where} with decoding_type NGram and {length}. NGram is suffix matching "
            "against earlier text, not lookahead decoding, so acceptance rates and speed-up "
            "will differ: benchmark it."
        )

    def add_speculative_config(self, config: CommentedMap, note: str) -> str | None:
        """Put config at llm_config.speculative_config; returns its path, or None if not added."""
        if "max_draft_len" in config:
            add_eol_comment(
                config, "max_draft_len", 2 * self.indent.mapping, f"{_MARK} from {note}"
            )
        llm = self.root.get("llm_config")
        if is_null(llm):
            llm = CommentedMap()
            llm["speculative_config"] = config
            if "llm_config" in self.root:
                self.root["llm_config"] = llm
            else:
                insert_after(self.root, "trt_llm", "llm_config", llm)
        elif not isinstance(llm, CommentedMap):
            self.warn(
                "llm_config: not a mapping, so the NGram speculative_config that replaces "
                "trt_llm.build.speculator was not added."
            )
            return None
        elif "speculative_config" in llm:
            self.warn(
                "trt_llm.build.speculator: removed; llm_config.speculative_config already "
                "exists and was kept unchanged."
            )
            return None
        elif not llm:
            llm["speculative_config"] = config
            llm.fa.set_block_style()
        else:
            if llm.fa.flow_style():
                to_block((self.root, "llm_config"))
            insert_after(llm, list(llm)[-1], "speculative_config", config)
        return "llm_config.speculative_config"

    def runtime(self, moved: list[Entry]) -> None:
        """Step 7, the v1-only runtime fields, and the build fields that moved here."""
        if is_null(self.trt.get("runtime")):  # v2 requires a runtime block
            if "runtime" in self.trt:
                self.trt["runtime"] = CommentedMap()
            else:
                after = "build" if "build" in self.trt else list(self.trt)[-1]
                insert_after(self.trt, after, "runtime", CommentedMap())
        runtime: CommentedMap = self.trt["runtime"]
        parent = (self.trt, "runtime")

        if "enable_chunked_context" in runtime:  # step 7
            if "enable_chunked_prefill" in runtime:
                value = remove_key(runtime, "enable_chunked_context", parent)
                self.warn(
                    "trt_llm.runtime.enable_chunked_context: removed; "
                    "enable_chunked_prefill is already set and was kept (the old value "
                    f"was {scalar_text(value)})."
                )
            else:
                rename_key(runtime, "enable_chunked_context", "enable_chunked_prefill")

        for key in list(runtime):
            if key not in _V1_ONLY_RUNTIME:
                continue
            value = self.remove_noted(parent, key, 2 * self.indent.mapping, "no v2 equivalent")
            self.warn(
                f"trt_llm.runtime.{key}: removed (was {scalar_text(value)}); v2 has no "
                "documented equivalent. A line comment marks where it was."
            )

        if moved:
            insert_first(parent, moved)

        tokens = runtime.get("max_num_tokens")
        if is_number(tokens) and tokens > V2_MAX_NUM_TOKENS:
            runtime["max_num_tokens"] = V2_MAX_NUM_TOKENS
            self.warn(
                f"trt_llm.runtime.max_num_tokens: {tokens} is above the v2 maximum of "
                f"{V2_MAX_NUM_TOKENS}; clamped to {V2_MAX_NUM_TOKENS}."
            )

    def autoscaling(self) -> None:
        """Replace concurrency_target with an in_flight_tokens target."""
        settings = self.root.get("autoscaling_settings")
        if is_null(settings):
            return
        if not isinstance(settings, CommentedMap):
            self.warn("autoscaling_settings: not a mapping; left unchanged.")
            return
        parent = (self.root, "autoscaling_settings")
        column = self.indent.mapping
        if is_number(settings.get("min_replica")) and settings["min_replica"] < 1:
            self.warn(
                "autoscaling_settings.min_replica: v2 cannot scale to zero; "
                "it will keep at least one replica."
            )
        has_concurrency = "concurrency_target" in settings
        concurrency = None
        if has_concurrency:
            concurrency = self.remove_noted(
                parent, "concurrency_target", column, "v2 scales on in-flight tokens"
            )
        if "target_utilization_percentage" in settings:
            self.remove_noted(parent, "target_utilization_percentage", column, "rejected by v2")
            if not has_concurrency:
                self.warn(
                    "autoscaling_settings.target_utilization_percentage: removed; v2 "
                    "rejects it and scales on in-flight tokens instead."
                )
        if not has_concurrency:
            return
        if not is_number(concurrency):
            self.warn(
                f"autoscaling_settings.concurrency_target: removed; its value "
                f"{scalar_text(concurrency)} is not a number, so no in_flight_tokens "
                "target was derived. Set additional_autoscaling_config by hand."
            )
            return
        target = round(concurrency * self.tokens_per_request)
        basis = (
            f"concurrency_target {concurrency} × {self.tokens_per_request} assumed tokens "
            "per request"
        )
        if "additional_autoscaling_config" in self.root:
            self.warn(
                f"autoscaling_settings.concurrency_target: removed; "
                f"additional_autoscaling_config already exists and was kept (the estimate "
                f"from {basis} would be {target} in-flight tokens)."
            )
            return
        metric = CommentedMap()
        metric["name"] = "in_flight_tokens"
        metric["target"] = target
        add_eol_comment(
            metric,
            "target",
            self.indent.mapping + self.indent.sequence,
            f"{_MARK} estimate; tune against autoscaler_in_flight_tokens",
        )
        config = CommentedMap()
        config["metrics"] = CommentedSeq([metric])
        insert_after(self.root, "autoscaling_settings", "additional_autoscaling_config", config)
        self.warn(
            f"additional_autoscaling_config.metrics[0].target: {target} in-flight tokens is "
            f"an estimate ({basis}, e.g. 4K in + 1K out = 5000); tune it against the "
            "autoscaler_in_flight_tokens metric. autoscaling_settings.concurrency_target "
            "and target_utilization_percentage were removed (v2 rejects them)."
        )


def migrate_text(text: str, *, tokens_per_request: int = 5000) -> Migration:
    """Migrate a v1 (Engine-Builder-LLM) config.yaml text to v2 (BIS-LLM).

    A config that already says `inference_stack: v2` is returned unchanged.
    """
    if not is_number(tokens_per_request) or tokens_per_request <= 0:
        raise ValueError(f"tokens_per_request must be positive, got {tokens_per_request!r}")
    indent = detect_indent(text)
    yaml = make_yaml(text, indent)
    try:
        root = yaml.load(text)
    except YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise MigrationError(f"config.yaml is not valid YAML{where}: {problem}") from exc
    if not isinstance(root, CommentedMap):
        if root is None:
            got = "an empty document"
        elif isinstance(root, list):
            got = "a list"
        else:
            got = f"the scalar {scalar_text(root)}"
        raise MigrationError(f"config.yaml must be a YAML mapping at the top level, got {got}")
    if "trt_llm" not in root:
        raise MigrationError("config.yaml has no trt_llm block, so there is nothing to migrate")
    if not isinstance(root["trt_llm"], CommentedMap):
        raise MigrationError("trt_llm must be a mapping")

    stack = root["trt_llm"].get("inference_stack")
    if stack == "v2":
        return Migration(text, text, False, [])
    if not is_null(stack) and stack != "v1":
        raise MigrationError(
            f"trt_llm.inference_stack is {scalar_text(stack)}; expected v1 or v2 (absent means v1)"
        )

    migrator = _Migrator(root, text, indent, tokens_per_request)
    migrator.run()
    migrated = dump(yaml, root, text)
    return Migration(text, migrated, migrated != text, migrator.warnings)
