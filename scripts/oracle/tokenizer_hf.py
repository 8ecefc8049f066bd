#!/usr/bin/env python3
"""Python `tokenizers`' side of flotilla's tokenizer check (tests/tokenizer.rs).

    tokenizer_hf.py --text FILE --out DIR [--vocab N]
        Trains a byte-level BPE (ByteLevel pre-tokenizer and decoder, the
        whole byte alphabet, `<|endoftext|>` as a special token, N ids in
        all, 512 by default) on FILE and saves it as DIR/tokenizer.json.
        Then tokenizes FILE by the rule of flotilla's `data.kind: text` with
        a `tokenizer`: the text cut after every line break, each piece
        encoded without special tokens, the ids joined in order; writes them
        to DIR/ids.u16 (flat little-endian u16, a `data.kind: tokens` file)
        and prints their count and the number of distinct ids as JSON.
"""

import argparse
import json

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers


def pieces(text):
    """The text cut after every "\\n"; the last piece may lack one."""
    parts = text.split("\n")
    out = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        out.append(parts[-1])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--vocab", type=int, default=512)
    args = ap.parse_args()

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([args.text], trainer)
    tok.save(f"{args.out}/tokenizer.json")

    # Tokenize with the saved file, as flotilla reads it.
    tok = Tokenizer.from_file(f"{args.out}/tokenizer.json")
    tok.no_truncation()
    tok.no_padding()
    with open(args.text, encoding="utf-8", newline="") as f:
        text = f.read()
    ids = []
    for enc in tok.encode_batch(pieces(text), add_special_tokens=False):
        ids.extend(enc.ids)
    np.asarray(ids, dtype="<u2").tofile(f"{args.out}/ids.u16")
    print(json.dumps({"tokens": len(ids), "distinct": len(set(ids)), "vocab": tok.get_vocab_size()}))


if __name__ == "__main__":
    main()
