"""An offline CLIP-format byte-level BPE tokenizer for the embedded default model.

Every byte has a token (with and without the end-of-word marker), so any typed text, emoji included,
tokenizes without unknown tokens; the words of the shapes captions are single tokens via merges.
Built with transformers' own ``CLIPTokenizer`` so ``StableDiffusionPipeline`` saves and loads it as usual.
"""
from __future__ import annotations

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
EXTRA_WORDS = ("grey", "middle", "corner", "upper", "lower", "big", "tiny", "picture", "image", "photo", "of",
               "with", "two", "three", "one", "next", "to", "above", "below", "shape", "shapes", "dark", "light")


def bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table (256 characters, byte order)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def build_vocab(words: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Byte tokens + one merge chain per word (left to right); special tokens not included."""
    chars = bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    for word in sorted(set(w.lower() for w in words)):
        pieces = [chars[b] for b in word.encode("utf-8")]
        pieces[-1] += "</w>"
        _add_chain(pieces, tokens, merges)
    return tokens, merges


def _add_chain(pieces: list[str], tokens: list[str], merges: list[tuple[str, str]]) -> bool:
    """Append merges joining `pieces` left to right; True if anything was added."""
    known_t, known_m = set(tokens), set(merges)
    added = False
    left = pieces[0]
    for right in pieces[1:]:
        if (left, right) not in known_m:
            merges.append((left, right))
            known_m.add((left, right))
            added = True
        left = left + right
        if left not in known_t:
            tokens.append(left)
            known_t.add(left)
    return added


def build_tokenizer(words: list[str] | None = None, max_length: int = 77) -> CLIPTokenizer:
    """The default model's tokenizer (shapes vocabulary plus a few common words), all words single tokens."""
    if words is None:
        from visattn.data.shapes import vocabulary

        words = vocabulary() + list(EXTRA_WORDS)
    tokens, merges = build_vocab(words)
    for _ in range(8):  # merges of different words can interfere: chain the leftover pieces until words are whole
        tok = _make(tokens, merges, max_length)
        added = False
        for word in sorted(set(w.lower() for w in words)):
            pieces = tok.tokenize(word)
            if len(pieces) > 1:
                added |= _add_chain(pieces, tokens, merges)
        if not added:
            break
    return _make(tokens, merges, max_length)


def _make(tokens: list[str], merges: list[tuple[str, str]], max_length: int) -> CLIPTokenizer:
    vocab = {t: i for i, t in enumerate(tokens + [BOS, EOS])}
    return CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=max_length, bos_token=BOS,
                         eos_token=EOS, unk_token=EOS, pad_token=EOS)
