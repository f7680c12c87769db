"""`tcexport generate`: generate text with an exported (and possibly compressed) decoder graph."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--prompt", "texts", multiple=True, help="Prompt text (repeat for a batch).")
@click.option("--prompt-ids", "ids_texts", multiple=True, help="Prompt as comma-separated token ids (repeatable).")
@click.option("--chat", is_flag=True, help="Wrap --prompt in the tokenizer's chat template as a user turn.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="With --sample: softmax temperature.")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0, show_default=True,
              help="With --sample: nucleus size.")
@click.option("--seed", type=int, default=0, show_default=True, help="With --sample: random seed.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="ONNX Runtime intra-op threads.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write prompt_ids, tokens, logprobs, text, ttft_ms, decode_tokens_per_s, kv_bytes, cache lengths.")
def generate(model, texts, ids_texts, chat, max_new_tokens, sample, temperature, top_p, seed, threads, json_path):
    """Generate with a decoder graph (or its ONNX Runtime build): greedy unless --sample.

    The prompt goes through the model's own tokenizer (its default special tokens; the chat template with
    --chat); generation stops at the model's EOS. The text of a single prompt streams to stdout.

    \b
    Example:
      tcexport export hf:SmolLM2-135M-Instruct -o smollm2.onnx
      tcexport generate smollm2.onnx --prompt "What is the capital of France?" --chat
    """
    from tcexport.generation import loop, run

    sampling = loop.Sampling(temperature, top_p, seed) if sample else loop.Sampling()
    report = run.run(model, texts, ids_texts, chat, max_new_tokens, sampling, threads, json_path)
    if len(report["tokens"]) > 1 or report.get("text") is None:
        for row, tokens in enumerate(report["tokens"]):
            shown = report["text"][row] if report.get("text") else ",".join(map(str, tokens))
            click.echo(f"[{row}] {shown}")
    click.echo(f"ttft {report['ttft_ms']:.1f} ms, decode {report['decode_tokens_per_s']:.1f} tokens/s, "
               f"kv {report['kv_bytes'] / 2**20:.2f} MiB", err=True)
