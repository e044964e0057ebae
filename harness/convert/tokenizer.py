"""LISA's tokenizer, rebuilt on transformers 5 so that our prompt ids equal the ones LISA evaluated with.

LISA pins transformers 4.31 and loads its checkpoint's tokenizer slow (`use_fast=False`): LLaMA's sentencepiece
`tokenizer.model`, its `legacy` behaviour (every text piece between added tokens gets sentencepiece's "▁" prefix),
and the tokens of `added_tokens.json` (`[SEG]`, and LLaVA's `<im_start>`/`<im_end>`/`<im_patch>`). 4.31 treats every
added token as unsplittable and strips the whitespace on both sides of it (`PreTrainedTokenizer.tokenize`, "We strip
left and right by default"), so "ASSISTANT: [SEG]." is read as "ASSISTANT:", "[SEG]", "." and the token before
[SEG], whose hidden state becomes the mask prompt, is ":". A transformers 5 tokenizer loaded as is keeps that space
(a "▁" token before [SEG], LISA issue #55) and tokenizes "\\n" after `<im_end>`.

Here: transformers' own sentencepiece conversion (`LlamaTokenizer`, legacy) with LISA's added tokens marked
`lstrip`/`rstrip`, which is 4.31's stripping expressed in the fast tokenizer. `tests/data/lisa_tokenizer/golden.json`
holds the ids the real 4.31 slow tokenizer gives; the tests compare against it. A transformers-layout LLaVA-1.5 gets
the same treatment (`llava_tokenizer`): LLaVA-1.5 itself trained with 4.31's slow tokenizer.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from tokenizers import AddedToken, normalizers
from transformers import PreTrainedTokenizerFast

from harness.files import read_json

FILES = ("tokenizer.model", "tokenizer_config.json", "added_tokens.json")
SENTENCEPIECE_SPECIALS = ("<unk>", "<s>", "</s>")  # ids 0-2 of LLaMA's sentencepiece model


def lisa_tokenizer(folder: str | Path, *, need_im_tokens: bool) -> PreTrainedTokenizerFast:
    """The tokenizer of a LISA checkpoint folder, ids as LISA's transformers 4.31 slow tokenizer gives them.

    Args:
        folder: the checkpoint folder (tokenizer.model, tokenizer_config.json, added_tokens.json).
        need_im_tokens: the config sets `mm_use_im_start_end`, so <im_start> and <im_end> must be added tokens.
    """
    folder = Path(folder)
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        raise ValueError(f"{folder} lacks the tokenizer file(s) {', '.join(missing)}; a LISA checkpoint ships "
                         f"{', '.join(FILES)} next to its weights: download them too")
    config = read_json(folder / "tokenizer_config.json", "download the tokenizer files again")
    if config.get("legacy", True) is False:
        raise ValueError(f"{folder / 'tokenizer_config.json'} sets legacy: false, but LISA evaluated with the legacy "
                         f"LLaMA tokenizer of transformers 4.31 (with legacy: false 4.31 maps words after added tokens "
                         f"to <unk>); remove the key or set it to true")
    added = read_json(folder / "added_tokens.json", "download the tokenizer files again")  # token -> id
    if "[SEG]" not in added:
        raise ValueError(f"{folder / 'added_tokens.json'} has no [SEG] token: not a LISA checkpoint")
    if need_im_tokens and not {"<im_start>", "<im_end>"} <= added.keys():
        raise ValueError(f"the config sets mm_use_im_start_end but {folder / 'added_tokens.json'} lacks <im_start> / "
                         f"<im_end> (LISA++ checkpoints look like this; segprune does not support LISA++ yet)")
    return legacy_llama(folder / "tokenizer.model", added, folder)


def llava_tokenizer(folder: str | Path, *, add_seg: bool) -> PreTrainedTokenizerFast:
    """The tokenizer of a transformers-layout LLaVA-1.5 folder under the same 4.31 rules: LLaVA-1.5 was trained, and a
    LISA-style head on it would be, with 4.31's slow tokenizer of the same sentencepiece model. The folder's added
    tokens (`<image>`, `<pad>`, `[SEG]`) keep their ids; `add_seg` appends `[SEG]` when the folder has none."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not (folder / "tokenizer.model").is_file():
        raise ValueError(f"{folder} lacks tokenizer.model; segprune rebuilds LLaVA-1.5's tokenizer from its "
                         f"sentencepiece model (llava-hf/llava-1.5-7b-hf ships one): copy it into the folder")
    try:
        stock = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise ValueError(f"{folder}: no usable tokenizer ({err}); the folder needs its tokenizer files") from None
    added = {t.content: i for i, t in stock.added_tokens_decoder.items() if t.content not in SENTENCEPIECE_SPECIALS}
    if "[SEG]" not in added and add_seg:
        added["[SEG]"] = max([*added.values(), len(stock) - 1]) + 1
    return legacy_llama(folder / "tokenizer.model", added, folder)


def legacy_llama(model_file: Path, added: dict[str, int], folder: Path) -> PreTrainedTokenizerFast:
    """LLaMA's sentencepiece `model_file` with 4.31's legacy slow-tokenizer rules and the `added` tokens (token -> id,
    which must follow the sentencepiece vocabulary in order); `folder` names the files in errors."""
    import sentencepiece
    from transformers import LlamaTokenizer

    try:
        if sentencepiece.SentencePieceProcessor(model_file=str(model_file)).get_piece_size() < 3:
            raise RuntimeError("no pieces")
    except (RuntimeError, OSError) as err:  # (transformers would fall back to reading it as tiktoken)
        raise ValueError(f"{model_file} is not a sentencepiece model ({str(err).splitlines()[0]}); download it "
                         f"again") from None
    with tempfile.TemporaryDirectory() as tmp:  # the sentencepiece model alone: never a tokenizer.json beside it
        shutil.copyfile(model_file, Path(tmp) / "tokenizer.model")
        tok = LlamaTokenizer.from_pretrained(tmp, legacy=True, add_bos_token=True, add_eos_token=False)
    # sentencepiece's dummy prefix on every piece, even one that starts with a space (the Metaspace pre-tokenizer
    # transformers 5 uses skips those): transformers 4's legacy fast-tokenizer normalizer
    tok.backend_tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                                             normalizers.Replace(" ", "\u2581")])
    tok.backend_tokenizer.pre_tokenizer = None
    # 4.31 strips whitespace on both sides of every added token (see the module docstring)
    tok.add_tokens([AddedToken(t, lstrip=True, rstrip=True, normalized=False, special=False)
                    for t in sorted(added, key=added.get)])
    for token, index in added.items():
        if tok.convert_tokens_to_ids(token) != index:
            raise ValueError(f"{folder}: added token {token} has id {tok.convert_tokens_to_ids(token)} here but "
                             f"{index} in the folder's tokenizer files; the tokenizer files do not belong together")
    tok.pad_token = tok.unk_token  # LISA: pad with <unk>, on the right
    tok.padding_side = "right"
    return tok
