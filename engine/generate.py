"""`t5forge generate`: decode text with a trained model (greedy, beam search or sampling, KV cache).

    t5forge generate --model runs/sst2/best "sst2 sentence: a gorgeous, witty film"
    t5forge generate --model t5-small-hf --prefix "translate English to German: " --file sentences.txt
    cat inputs.txt | t5forge generate --model DIR --num-beams 4 --max-new-tokens 128
    t5forge generate --model DIR --do-sample --top-p 0.9 --seed 0 --num-return-sequences 3 "..."
    t5forge generate --model base_dir --adapters runs/x/best/adapters.safetensors "..."

The decoding options are `generate`'s (Hugging Face's names and meanings, models/generation_config.py);
an option left out takes the checkpoint's generation_config.json value, else the default. Inputs come from
the arguments, else from `--file` (one per line), else from stdin; one output line per input and returned
sequence, in order. The tokenizer is the model directory's own (DIR/spiece.model, or ByT5's when its
tokenizer_config.json names ByT5Tokenizer) unless `--tokenizer` names one; `--tokenizer byt5` is ByT5's
byte-level tokenizer (engine/byt5.py).
"""
from __future__ import annotations

import argparse
import pathlib
import sys

# (flag, type, help): each becomes the generate() argument of the same name, passed only when given.
_OPTIONS = (
    ("--max-new-tokens", int, "generated tokens at most (overrides --max-length)"),
    ("--max-length", int, "decoder positions including the start token (Hugging Face's meaning; default 20)"),
    ("--min-new-tokens", int, "EOS is banned before this many generated tokens"),
    ("--num-beams", int, "1 = greedy / sampling (default)"),
    ("--num-return-sequences", int, "sequences per input (beams or samples), printed one per line"),
    ("--length-penalty", float, "beams: T5X's alpha in ((5 + length) / 6) ** alpha (default 0.6)"),
    ("--length-normalization", str, "t5x (default) or hf: length ** length_penalty"),
    ("--temperature", float, "sampling temperature"),
    ("--top-k", int, "sampling: keep the k most likely tokens (default 50; 0 = off)"),
    ("--top-p", float, "sampling: nucleus probability mass (default 1.0 = off)"),
    ("--no-repeat-ngram-size", int, "ban repeating n-grams of this size"),
    ("--repetition-penalty", float, "CTRL repetition penalty (1.0 = off)"),
    ("--cache-implementation", str, "static (default) or dynamic KV cache"),
    ("--decode-kernels", str, "the decode step's kernels: auto, model, reference or sdpa-attention"),
)


def _compile_step(text: str):
    """--compile-step: true / false, or a mode of models/compiled_step.py (reduce-overhead, cuda-graph, ...)."""
    return {"true": True, "false": False}.get(text.lower(), text)


def _early_stopping(text: str):
    values = {"true": True, "false": False, "never": "never"}
    if text.lower() not in values:
        raise argparse.ArgumentTypeError(f"expected true, false or never, got {text!r}")
    return values[text.lower()]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t5forge generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("texts", nargs="*", help="input texts (default: --file, else stdin)")
    p.add_argument("--model", required=True, help="Hugging Face layout directory (config.json + weights)")
    p.add_argument("--tokenizer", default="", help="SentencePiece model, or byt5 (default: the model directory's own)")
    p.add_argument("--adapters", default="", help="adapter file written by fine-tuning with adapters")
    p.add_argument("--file", default="", help="read inputs from this file, one per line")
    p.add_argument("--prefix", default="", help='prepended to every input, e.g. "summarize: "')
    for flag, kind, text in _OPTIONS:
        p.add_argument(flag, type=kind, default=None, help=text)
    p.add_argument("--do-sample", action="store_true", default=None, help="sample instead of greedy / beam")
    p.add_argument("--early-stopping", type=_early_stopping, default=None, help="beams: true, false or never")
    p.add_argument("--compile-step", type=_compile_step, default=None,
                   help="the decode step under torch.compile / CUDA graphs: true, false or a mode (docs/GENERATION.md)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling generator")
    p.add_argument("--max-input-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    return p


def _read_inputs(args) -> list[str]:
    from engine.errors import read_text

    if args.texts:
        return list(args.texts)
    if args.file:
        return read_text(args.file, "--file").splitlines()
    return sys.stdin.read().splitlines()


def pick_device(name: str):
    """`--device`: cpu, cuda or cuda:N, checked against this machine and this torch build."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: not a device name (cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise ValueError(f"--device {name}: {why}; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: only cpu and cuda are supported")
    return device


def pick_tokenizer(args, model_vocab: int) -> str:
    """`--tokenizer`, else the model directory's own (engine/tokenizer_files.py: MODEL/spiece.model or ByT5's
    tokenizer_config.json); checked against that copy (the same tokenizer) and the model's vocabulary (the
    ids must fit)."""
    from engine.tokenizer_files import check_fits_model, check_same_tokenizer, check_spec_exists, find_tokenizer
    from engine.tokenizer_files import open_tokenizer

    own = find_tokenizer(args.model)
    if args.tokenizer:
        check_spec_exists(args.tokenizer, "--tokenizer")
    elif own is None:
        raise FileNotFoundError(f"no tokenizer: the model directory {args.model} has no spiece.model or ByT5 "
                                "tokenizer_config.json (give --tokenizer)")
    spec = args.tokenizer or own
    ids = open_tokenizer(spec).vocab_size
    if args.tokenizer and own:
        check_same_tokenizer(spec, own, f"model {args.model}")
        if ids > model_vocab:
            raise ValueError(f"tokenizer {spec} has {ids} ids, more than the model's {model_vocab}")
    else:
        check_fits_model(ids, model_vocab, spec, f"model {args.model}")
    return spec


def load_model(args):
    """The model of `--model` (config and weights verified on load) with `--adapters` if given."""
    from models.hf_checkpoint import from_pretrained, read_config, verify_safetensors

    read_config(args.model)  # a missing or damaged model directory is reported before the tokenizer
    device = pick_device(args.device)
    if args.adapters:
        if pathlib.Path(args.adapters).is_dir():
            raise ValueError(f"--adapters {args.adapters}: is a directory; give the adapters.safetensors file")
        verify_safetensors(args.adapters)
    model = from_pretrained(args.model, device=device, dropout_rate=0.0)
    if args.adapters:
        from models.adapters import load_adapters

        load_adapters(model, args.adapters)
    return model


def generation_kwargs(args) -> dict:
    """The generate() arguments the command line gave (the rest come from the checkpoint / defaults)."""
    names = [flag[2:].replace("-", "_") for flag, _, _ in _OPTIONS] + ["do_sample", "early_stopping", "compile_step"]
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def generate_texts(model, tokenizer, texts: list[str], *, batch_size: int = 16, max_input_length: int = 512,
                   generator=None, **search) -> list[str]:
    """Decoded outputs for `texts`, batched by length (little padding), in input order; `search` are
    generate()'s arguments. With num_return_sequences n, the n outputs of an input are adjacent."""
    import torch

    from models.generation import generate

    device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    outputs: dict[int, list[str]] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids = tokenizer.encode_batch([texts[i] for i in chunk], add_eos=True)
        ids = [x if len(x) <= max_input_length else x[: max_input_length - 1] + [x[-1]] for x in ids]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([x + [0] * (width - len(x)) for x in ids], device=device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)
        sequences = generate(model, input_ids, mask, generator=generator, **search)[:, 1:].tolist()
        per_input = len(sequences) // len(chunk)
        for row, seq in enumerate(sequences):
            if tokenizer.eos_id in seq:
                seq = seq[: seq.index(tokenizer.eos_id)]
            outputs.setdefault(chunk[row // per_input], []).append(tokenizer.decode(seq, skip_special=True))
    return [text for i in range(len(texts)) for text in outputs[i]]


def generate_main(argv: list[str]) -> int:
    from engine.errors import USER_ERRORS, report

    args = _parser().parse_args(argv)
    try:
        import torch

        from engine.tokenizer_files import open_tokenizer
        from models.hf_checkpoint import read_config

        for name in ("batch_size", "max_input_length"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
        model_vocab = read_config(args.model).vocab_size
        pick_device(args.device)
        tokenizer = open_tokenizer(pick_tokenizer(args, model_vocab))
        texts = [args.prefix + t for t in _read_inputs(args)]
        if not texts:
            raise ValueError("no input text (give it as arguments, --file or on stdin)")
        model = load_model(args)
        model.eval()
        generator = None if args.seed is None else torch.Generator(device=args.device).manual_seed(args.seed)
        with torch.inference_mode():
            outputs = generate_texts(model, tokenizer, texts, batch_size=args.batch_size,
                                     max_input_length=args.max_input_length, generator=generator,
                                     **generation_kwargs(args))
    except (*USER_ERRORS, TypeError) as err:   # TypeError: a generate() option we do not support
        return report("generate", err)
    for line in outputs:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(generate_main(sys.argv[1:]))
