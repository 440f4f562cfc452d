"""Our ByT5 tokenizer (engine/byt5.py) against transformers' ByT5Tokenizer: the same ids for every kind of
text, the same text back, and a random ByT5 (v1.1 layout, 384 ids) generating through both stacks alike."""
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

from engine.byt5 import ByT5Tokenizer  # noqa: E402

TEXTS = ["hello", "", " leading and trailing ", "héllo wörld €", "日本語のテキスト", "emoji 👍🏽 and flags 🇩🇪",
         "e\u0301 combining", "tabs\tand\nnewlines\r\n", "a<extra_id_0>b<extra_id_124> c", "</s>x<pad><unk>",
         "<extra_id_07> <extra_id_125> <extra_id_> <<pad>> <extra_id_5", "summarize: <extra_id_3>.",
         "\x00\x7f control bytes", "x" * 300]


@pytest.fixture(scope="module")
def theirs():
    return transformers.ByT5Tokenizer()


def test_ids_equal_transformers(theirs):
    ours = ByT5Tokenizer()
    assert ours.vocab_size == len(theirs) == 384
    for text in TEXTS:
        assert ours.encode(text, add_eos=True) == theirs(text).input_ids, text
        assert ours.encode(text) == theirs(text, add_special_tokens=False).input_ids, text
    assert ours.encode_batch(TEXTS, add_eos=True) == theirs(TEXTS).input_ids
    assert [ours.id_to_piece(i) for i in (0, 1, 2, 107, 259, 383)] == theirs.convert_ids_to_tokens(
        [0, 1, 2, 107, 259, 383])
    assert ours.sentinel_id(0) == 383 and ours.sentinel_id(124) == 259
    with pytest.raises(ValueError, match="sentinel index 125"):
        ours.sentinel_id(125)


def test_decode_equals_transformers(theirs):
    ours = ByT5Tokenizer()
    rng = random.Random(0)
    cases = [theirs(t).input_ids for t in TEXTS] + [[rng.randrange(384) for _ in range(40)] for _ in range(50)]
    for ids in cases:
        assert ours.decode(ids, skip_special=True) == theirs.decode(ids, skip_special_tokens=True), ids
        kept = [i for i in ids if i > 2]  # we drop pad / EOS / unk as engine/tokenizer.py does
        assert ours.decode(ids) == theirs.decode(kept), ids
    for text in TEXTS:
        if not any(s in text for s in ("</s>", "<pad>", "<unk>")):  # (those are dropped, above)
            assert ours.decode(ours.encode(text)) == text


def test_random_byt5_generates_the_same_text(tmp_path):
    from models.hf_checkpoint import from_pretrained

    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=384, d_model=24, d_kv=8, d_ff=40, num_layers=2, num_heads=3, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval()
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path, kernel_backend="torch").eval()
    tok, ref = ByT5Tokenizer(), transformers.ByT5Tokenizer()
    texts = ["translate: héllo", "wörld <extra_id_0> ok"]
    batch = ref(texts, return_tensors="pt", padding=True)
    width = batch.input_ids.shape[1]
    ids = torch.tensor([x + [0] * (width - len(x)) for x in tok.encode_batch(texts, add_eos=True)])
    assert ids.tolist() == batch.input_ids.tolist()
    a = hf.generate(**batch, max_new_tokens=12, num_beams=2)
    b = ours.generate(ids, (ids != 0).long(), max_new_tokens=12, num_beams=2, length_penalty=1.0,
                      length_normalization="hf")
    assert [tok.decode(x, skip_special=True) for x in b.tolist()] == ref.batch_decode(a, skip_special_tokens=True)


def test_generate_cli_with_byt5_tokenizer(tmp_path, capsys):
    from engine.generate import generate_main
    from models.config import T5Config
    from models.t5 import T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=384, d_model=24, d_kv=8, d_ff=40, num_layers=2,
                                                num_heads=3, kernel_backend="torch"))
    model.save_pretrained(tmp_path)
    assert generate_main(["--model", str(tmp_path), "--tokenizer", "byt5", "--max-new-tokens", "4", "héllo", "x"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
