"""Rebuild Qwen2's byte-level BPE tokenizer.json from Qwen's shipped qwen.tiktoken (the 151,643 BPE ranks that
Qwen2's vocab.json/merges.txt hold, same ids), with Qwen2's pre-tokenizer regex and special tokens."""
import base64, json, sys
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, normalizers, Regex
from transformers.convert_slow_tokenizer import bytes_to_unicode

src, out = sys.argv[1], sys.argv[2]
ranks = {}
for line in open(src, "rb"):
    if line.strip():
        tok, r = line.split()
        ranks[base64.b64decode(tok)] = int(r)

def bpe(token, max_rank):
    parts = [bytes([b]) for b in token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best is None or r < best[1]):
                best = (i, r)
        if best is None:
            return parts
        i = best[0]
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]

b2u = bytes_to_unicode()
enc = lambda b: "".join(b2u[x] for x in b)
vocab = {enc(t): r for t, r in ranks.items()}
merges = []
for t, r in sorted(ranks.items(), key=lambda x: x[1]):
    if len(t) == 1:
        continue
    p = bpe(t, r)
    assert len(p) == 2, (t, p)
    merges.append((enc(p[0]), enc(p[1])))
PAT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False, fuse_unk=False, unk_token=None))
tk.normalizer = normalizers.NFC()
tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PAT), behavior="isolated", invert=False),
                                            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
tk.decoder = decoders.ByteLevel()
from tokenizers import AddedToken
specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
            "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
assert tk.token_to_id("<|endoftext|>") == 151643 and tk.token_to_id("<|video_pad|>") == 151656
tk.save(out)
