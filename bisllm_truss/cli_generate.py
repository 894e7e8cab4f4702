"""`bisllm generate`: run the engine offline on one prompt (a smoke test for a checkpoint)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click


def _parse_ids(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(part) for part in value.replace(" ", "").split(",") if part]
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated integers such as 1,2,3, got {value!r}",
            param_hint="--prompt-ids",
        ) from None


def _render_chat(tokenizer, user: str, system: str | None) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat needs a checkpoint whose tokenizer has a chat template")
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": user})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@click.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--prompt", help="Prompt text (needs the checkpoint's tokenizer).")
@click.option("--prompt-ids", help="Prompt as comma-separated token ids, e.g. 1,2,3.")
@click.option(
    "--chat", help="A user message, rendered with the checkpoint's chat template (a new turn)."
)
@click.option("--system", help="With --chat: a system message before it.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option(
    "--temperature",
    type=click.FloatRange(min=0.0),
    default=0.0,
    show_default=True,
    help="0 is greedy.",
)
@click.option("--top-p", type=click.FloatRange(min=0.0, max=1.0, min_open=True), default=1.0)
@click.option("--top-k", type=int, default=0, help="0 disables top-k.")
@click.option("--seed", type=int, default=None, help="Per-request sampling seed.")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past end-of-sequence tokens.")
@click.option("--dtype", default="auto", show_default=True, help="auto, bf16, fp16 or fp32.")
@click.option("--device", default="cpu", show_default=True)
@click.option(
    "--json", "as_json", is_flag=True, help="End with one JSON line: token_ids, text, ..."
)
def generate(
    model_dir: Path,
    prompt: str | None,
    prompt_ids: str | None,
    chat: str | None,
    system: str | None,
    max_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    stop: tuple[str, ...],
    ignore_eos: bool,
    dtype: str,
    device: str,
    as_json: bool,
) -> None:
    """Generate from MODEL_DIR (an HF checkpoint directory) with the bisllm engine."""
    ids = _parse_ids(prompt_ids)
    if sum(x is not None for x in (prompt, ids, chat)) != 1:
        raise click.UsageError("give exactly one of --prompt, --prompt-ids or --chat")
    if system is not None and chat is None:
        raise click.UsageError("--system goes with --chat")
    # The engine pulls in torch; import it only for this command.
    from bisllm_server.engine.config import EngineConfig
    from bisllm_server.engine.engine import LLMEngine, RequestError
    from bisllm_server.engine.loader import UnsupportedModelError
    from bisllm_server.engine.sampling import SamplingParams, SamplingParamsError

    try:
        engine = LLMEngine(EngineConfig(model=model_dir, dtype=dtype, device=device))
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=list(stop),
            ignore_eos=ignore_eos,
        )
        if chat is not None:
            prompt = _render_chat(engine.tokenizer, chat, system)
        start = time.perf_counter()
        rid = engine.add_request(prompt if ids is None else ids, params)
    except (UnsupportedModelError, RequestError, SamplingParamsError, ValueError) as exc:
        click.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(1)

    token_ids: list[int] = []
    text = ""
    final = None
    while final is None:
        for out in engine.step():
            if out.request_id != rid:
                continue
            token_ids.extend(out.new_token_ids)
            text += out.new_text
            if not as_json:
                click.echo(out.new_text, nl=False)
            if out.finished:
                final = out
    elapsed = time.perf_counter() - start
    if as_json:
        click.echo(
            json.dumps(
                {
                    "token_ids": token_ids,
                    "text": text,
                    "finish_reason": final.finish_reason,
                    "num_prompt_tokens": final.num_prompt_tokens,
                    "num_cached_tokens": final.num_cached_tokens,
                    "seconds": round(elapsed, 4),
                }
            )
        )
    else:
        click.echo()
        click.echo(
            f"[{len(token_ids)} tokens in {elapsed:.2f}s, finish_reason={final.finish_reason}]",
            err=True,
        )
