"""`t5forge generate`: decode text with a trained model (greedy or beam search, KV cache).

    t5forge generate --model runs/sst2/best "sst2 sentence: a gorgeous, witty film"
    t5forge generate --model t5-small-hf --prefix "translate English to German: " --file sentences.txt
    cat inputs.txt | t5forge generate --model DIR --num-beams 4 --max-length 128
    t5forge generate --model base_dir --adapters runs/x/best/adapters.safetensors "..."

Inputs come from the arguments, else from `--file` (one per line), else from stdin; one output line per
input, in order. The tokenizer is DIR/spiece.model unless `--tokenizer` names one.
"""
from __future__ import annotations

import argparse
import pathlib
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t5forge generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("texts", nargs="*", help="input texts (default: --file, else stdin)")
    p.add_argument("--model", required=True, help="Hugging Face layout directory (config.json + weights)")
    p.add_argument("--tokenizer", default="", help="SentencePiece model (default: MODEL/spiece.model)")
    p.add_argument("--adapters", default="", help="adapter file written by fine-tuning with adapters")
    p.add_argument("--file", default="", help="read inputs from this file, one per line")
    p.add_argument("--prefix", default="", help='prepended to every input, e.g. "summarize: "')
    p.add_argument("--num-beams", type=int, default=1, help="1 = greedy (default)")
    p.add_argument("--alpha", type=float, default=None, help="length penalty; default 0.6 with beams")
    p.add_argument("--max-length", type=int, default=64, help="generated tokens, EOS included")
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


def pick_tokenizer(args, model_vocab: int) -> pathlib.Path:
    """`--tokenizer`, else MODEL/spiece.model; checked against the model directory's own copy (the same
    bytes) and the model's vocabulary (the ids must fit)."""
    from engine.tokenizer import Tokenizer, check_fits_model, check_same_tokenizer

    own = pathlib.Path(args.model) / "spiece.model"
    tokenizer_file = pathlib.Path(args.tokenizer) if args.tokenizer else own
    if tokenizer_file.is_dir():
        raise ValueError(f"--tokenizer {tokenizer_file}: is a directory; give the SentencePiece .model file")
    if not tokenizer_file.is_file():
        what = "--tokenizer: file not found" if args.tokenizer else \
            "no tokenizer: the model directory has no spiece.model (give --tokenizer)"
        raise FileNotFoundError(f"{what}: {tokenizer_file}")
    ids = Tokenizer(tokenizer_file).vocab_size
    if args.tokenizer and own.is_file():
        check_same_tokenizer(tokenizer_file, own, f"model {args.model}")
        if ids > model_vocab:
            raise ValueError(f"tokenizer {tokenizer_file} has {ids} ids, more than the model's {model_vocab}")
    else:
        check_fits_model(ids, model_vocab, tokenizer_file, f"model {args.model}")
    return tokenizer_file


def load_model(args):
    """The model of `--model` (config and weights verified on load) with `--adapters` if given."""
    from models.checkpoint import from_pretrained, read_config, verify_safetensors

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


def generate_texts(model, tokenizer, texts: list[str], *, batch_size: int = 16, max_input_length: int = 512,
                   **search) -> list[str]:
    """Decoded outputs for `texts`, batched by length (little padding), returned in input order."""
    import torch

    from models.generation import generate

    device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    outputs: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids = tokenizer.encode_batch([texts[i] for i in chunk], add_eos=True)
        ids = [x if len(x) <= max_input_length else x[: max_input_length - 1] + [x[-1]] for x in ids]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([x + [0] * (width - len(x)) for x in ids], device=device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)
        out = generate(model, input_ids, mask, **search)
        for index, seq in zip(chunk, out.sequences.tolist()):
            if tokenizer.eos_id in seq:
                seq = seq[: seq.index(tokenizer.eos_id)]
            outputs[index] = tokenizer.decode(seq, skip_special=True)
    return [outputs[i] for i in range(len(texts))]


def generate_main(argv: list[str]) -> int:
    from engine.errors import USER_ERRORS, report

    args = _parser().parse_args(argv)
    try:
        import torch

        from engine.tokenizer import Tokenizer
        from models.checkpoint import read_config

        for name in ("num_beams", "max_length", "batch_size", "max_input_length"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
        model_vocab = read_config(args.model).vocab_size
        pick_device(args.device)
        tokenizer_file = pick_tokenizer(args, model_vocab)
        texts = [args.prefix + t for t in _read_inputs(args)]
        if not texts:
            raise ValueError("no input text (give it as arguments, --file or on stdin)")
        model = load_model(args)
        model.eval()
        with torch.inference_mode():
            outputs = generate_texts(model, Tokenizer(tokenizer_file), texts, batch_size=args.batch_size,
                                     max_input_length=args.max_input_length, max_length=args.max_length,
                                     num_beams=args.num_beams, alpha=args.alpha)
    except USER_ERRORS as err:
        return report("generate", err)
    for line in outputs:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(generate_main(sys.argv[1:]))
