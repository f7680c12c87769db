"""`tcexport tune`: search the compression plan with the best fidelity under a measured budget, on your data."""

from __future__ import annotations

from pathlib import Path

import click



@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--budget", "budget_text", required=True, metavar="KIND=RATIO",
              help="What the plan may cost vs the uncompressed model, measured: flops=0.75 (25% fewer FLOPs), "
                   "tokens=0.75, or latency=0.70 (ORT CPU, interleaved with the uncompressed model).")
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="Calibration data: an .npz of model inputs, a text file (st:/hf: text models; one sample per "
                   "paragraph or line) or a folder of images.")
@click.option("--methods", "methods_text", default=None, help="Methods to search (default tome,topk,prune-merge).")
@click.option("--trials", type=int, default=None, help="Trials to run (default 24 unless --time is given).")
@click.option("--time", "time_limit", type=float, default=None, help="Stop starting trials after this many seconds.")
@click.option("--holdout", type=float, default=0.25, show_default=True,
              help="Share of the data held out: never seen by the search, scored once for the best plan.")
@click.option("--metric", default=None, metavar="py:module:fn",
              help="Your fidelity metric: fn(reference_outputs, compressed_outputs) -> float, higher is better.")
@click.option("--ray", default=None, metavar="ADDRESS|auto",
              help="Send fidelity trials to a Ray cluster (auto: a running one, else local); needs tcexport[ray].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the optimizer.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="ONNX Runtime intra-op threads.")
@click.option("--protected", type=click.IntRange(min=0), default=None,
              help="Leading tokens never merged (default: from the export's provenance).")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output directory: best.yaml, pareto.json/.png, trials.jsonl, tune.json.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR even when it holds files tune did not write.")
def tune(model, budget_text, data, methods_text, trials, time_limit, holdout, metric, ray, seed, threads, protected,
         output, force):
    """Search the compression plan with the best fidelity under a measured budget, on your data.

    Searches method, blocks and amount per block (single and mixed multi-stage plans) with optuna, started
    from constant, decreasing, late-only and few-layer plans; every trial is sized to meet the budget. Fidelity
    is measured with ONNX Runtime against the uncompressed model on the search part of --data; the best plan is
    then scored once on the held-out part. Ctrl-C stops the search and keeps the best plan found.

    \b
    Example:
      tcexport tune minilm.onnx --budget flops=0.75 --data texts.txt --trials 30 -o out/tune
      tcexport tune vit.onnx --budget latency=0.7 --data images/ --methods tome,topk -o out/tune-vit
    """
    from tcexport.tune import command

    summary = command.tune(model, budget_text, data, output, methods_text=methods_text, trials=trials,
                           time_limit=time_limit, holdout=holdout, metric=metric, ray=ray, seed=seed,
                           threads=threads, protected=protected, force=force)
    best = summary["best"]
    click.echo(f"best plan ({summary['trials']} trials{', interrupted' if summary['interrupted'] else ''}): "
               f"{' + '.join(best['stages'])}")
    click.echo(f"  {summary['budget'].split('=')[0]} {best['cost']:.3f} of uncompressed (budget {summary['budget']}); "
               f"fidelity {best['fidelity_search']:.4f} on the search data, {best['fidelity_holdout']:.4f} held out")
    click.echo(f"wrote {output} (best.yaml runs with: tcexport build {output / 'best.yaml'} -o DIR)")
