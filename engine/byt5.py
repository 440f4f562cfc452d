"""ByT5's byte-level tokenizer, with the interface of engine/tokenizer.py's `Tokenizer`.

    tok = ByT5Tokenizer()
    tok.encode("héllo", add_eos=True)          # [107, 198, 172, 111, 111, 114, 1]
    tok.decode(ids, skip_special=True)

Ids equal transformers' `ByT5Tokenizer`: `<pad>` 0, `</s>` 1, `<unk>` 2, each UTF-8 byte b is b + 3, and
the 125 extra ids follow (`<extra_id_0>` = 259 ... `<extra_id_124>` = 383; vocabulary 384). Special-token
strings written in the text (`<pad>`, `</s>`, `<unk>`, `<extra_id_N>`) become their ids, as there. Decoding
joins the bytes and drops invalid UTF-8 (errors="ignore"); pad and EOS are dropped as our `Tokenizer`
drops them, and with `skip_special` the extra ids too (then equal to transformers'
`decode(skip_special_tokens=True)`).

`sentinel_id(i)` is the span-corruption sentinel: `vocab_size - 1 - i` (383 down), the convention of T5's
preprocessors (seqio's byte vocabulary) that ByT5 was pretrained with. Note that transformers names id 383
`<extra_id_124>`, not `<extra_id_0>`: its names count up, the sentinels count down.
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
OFFSET = 3
NUM_EXTRA_IDS = 125
_SPECIAL_RE = re.compile(r"<extra_id_(\d+)>|</s>|<pad>|<unk>")
_FIXED = {"</s>": EOS_ID, "<pad>": PAD_ID, "<unk>": UNK_ID}
_NAMES = {PAD_ID: "<pad>", EOS_ID: "</s>", UNK_ID: "<unk>"}


class ByT5Tokenizer:
    pad_id = PAD_ID
    eos_id = EOS_ID
    unk_id = UNK_ID

    def __init__(self, extra_ids: int = NUM_EXTRA_IDS, parse_special: bool = True):
        if extra_ids < 0:
            raise ValueError(f"ByT5Tokenizer: extra_ids must be >= 0, got {extra_ids}")
        self.num_sentinels = extra_ids
        self.parse_special = parse_special

    num_pieces = OFFSET + 256   # the ids before the extra ids, as `Tokenizer.num_pieces`
    num_threads = 1             # the interface of `Tokenizer` (data workers set it); encoding is pure Python

    @property
    def vocab_size(self) -> int:
        return self.num_pieces + self.num_sentinels

    def sentinel_id(self, i: int) -> int:
        if not 0 <= i < self.num_sentinels:
            raise ValueError(f"sentinel index {i} out of range [0, {self.num_sentinels})")
        return self.vocab_size - 1 - i

    def _special_id(self, match: re.Match) -> int | None:
        if match.group(1) is None:
            return _FIXED[match.group(0)]
        n = match.group(1)
        if int(n) >= self.num_sentinels or (len(n) > 1 and n[0] == "0"):
            return None  # "<extra_id_07>" / "<extra_id_125>" are not tokens: plain text
        return OFFSET + 256 + int(n)

    def encode(self, text: str, add_eos: bool = False) -> list[int]:
        ids: list[int] = []
        pos = 0
        if self.parse_special and "<" in text:
            for m in _SPECIAL_RE.finditer(text):
                special = self._special_id(m)
                if special is None:
                    continue
                ids.extend(b + OFFSET for b in text[pos:m.start()].encode("utf-8"))
                ids.append(special)
                pos = m.end()
        ids.extend(b + OFFSET for b in text[pos:].encode("utf-8"))
        if add_eos:
            ids.append(EOS_ID)
        return ids

    def encode_batch(self, texts: Sequence[str], add_eos: bool = False) -> list[list[int]]:
        return [self.encode(t, add_eos=add_eos) for t in texts]

    def id_to_piece(self, i: int) -> str:
        if i in _NAMES:
            return _NAMES[i]
        if OFFSET <= i < OFFSET + 256:
            return chr(i - OFFSET)  # the byte, as transformers' token string
        if OFFSET + 256 <= i < self.vocab_size:
            return f"<extra_id_{i - OFFSET - 256}>"
        raise ValueError(f"id {i} out of range [0, {self.vocab_size})")

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of ids: bytes joined (invalid UTF-8 dropped); pad, EOS, unknown and out-of-range ids
        dropped; extra ids written `<extra_id_N>` unless `skip_special`."""
        out = bytearray()
        for i in (int(x) for x in ids):
            if OFFSET <= i < OFFSET + 256:
                out.append(i - OFFSET)
            elif OFFSET + 256 <= i < self.vocab_size and not skip_special:
                out.extend(self.id_to_piece(i).encode("utf-8"))
        return out.decode("utf-8", errors="ignore")

    def __repr__(self) -> str:
        return f"ByT5Tokenizer(vocab_size={self.vocab_size})"
