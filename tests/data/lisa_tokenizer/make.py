"""Fixture: LISA-style tokenizer folders saved by transformers 4.31 (LISA's pinned version) and the ids its slow
LlamaTokenizer gives for LISA's evaluation prompts (the golden ids `tests/test_convert.py` checks our tokenizer
against).

Run in a throwaway environment with LISA's versions (no torch needed):
    uv venv /tmp/tf431 --python 3.11
    uv pip install --python /tmp/tf431/bin/python transformers==4.31.0 sentencepiece==0.2.3 "numpy<2"
    /tmp/tf431/bin/python tests/data/lisa_tokenizer/make.py

It trains a tiny sentencepiece BPE model with LLaMA's settings (byte fallback, split digits, dummy prefix, identity
normalization, no whitespace folding), then saves two tokenizer folders the way LLaVA + LISA built theirs:
`7b/` (LLaVA-Lightning-7B: <im_patch>, <im_start>, <im_end> added as special, then [SEG]: ids 32000-32003 in LISA-7B-v1,
here 400-403) and `13b/` (llava-llama-2-13b: <im_start>, <im_end>, [SEG]).
"""

import io
import json
import re
from pathlib import Path

import sentencepiece as spm
import transformers
from transformers import AutoTokenizer, LlamaTokenizer

HERE = Path(__file__).parent
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the human's questions.")
CORPUS = [SYSTEM,
          "USER: What is the red circle in this image? Please output segmentation mask. ASSISTANT: Sure, [SEG].",
          "the woman on the left holding an umbrella", "man in blue shirt", "What can be used to cut the bread?",
          "red green blue yellow purple small large triangle square circle star hexagon leftmost rightmost",
          "Hello world 1234 5678 \u00fc \u00e9 \u4e2d\u6587"] * 20
QUERIES = [("the red circle", False), ("man in blue shirt", False), ("leftmost small triangle", False),
           ("  padded   query  ", False), ("\u00fcber 42 \u4e2d\u6587 caf\u00e9", False), ("dog.", False),
           ("What can be used to cut the bread? Please explain why.", True), ("a line\nbreak", True)]


def lisa_input_ids(tok, query: str, is_sentence: bool, answer: bool) -> list[int]:
    """LISA's ValDataset prompt (llava_v1 template, <im_start><image><im_end>) through its tokenizer_image_token."""
    ask = f"{query} Please output segmentation mask." if is_sentence else \
        f"What is {query} in this image? Please output segmentation mask."
    prompt = f"{SYSTEM} USER: <im_start><image><im_end>\n {ask} ASSISTANT:" + (" [SEG].</s>" if answer else "")
    chunks = [tok(c).input_ids for c in prompt.split("<image>")]
    ids = [chunks[0][0]]  # BOS once; every chunk's own BOS dropped (offset 1)
    for i, c in enumerate(chunks):
        ids += ([-200] if i else []) + c[1:]
    return ids


def compact(golden: dict) -> str:
    """JSON with every id list on one line."""
    one_line = re.compile(r"\[\s*-?\d+(?:,\s*-?\d+)*\s*\]")
    text = json.dumps(golden, indent=1)
    return one_line.sub(lambda m: re.sub(r"\s+", "", m.group(0)).replace(",", ", "), text) + "\n"


def main() -> None:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=400, model_type="bpe", byte_fallback=True,
        split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, allow_whitespace_only_pieces=True, num_threads=1, minloglevel=2,
        character_coverage=1.0)
    (HERE / "tokenizer.model").write_bytes(model.getvalue())
    golden = {"transformers": transformers.__version__, "sentencepiece": spm.__version__, "cases": {}}
    for name, added in (("7b", ["<im_patch>", "<im_start>", "<im_end>"]), ("13b", ["<im_start>", "<im_end>"])):
        tok = LlamaTokenizer(vocab_file=str(HERE / "tokenizer.model"))
        tok.pad_token = tok.unk_token
        tok.add_tokens(added, special_tokens=True)  # LLaVA's initialize_vision_tokenizer
        tok.add_tokens("[SEG]")  # LISA's train_ds.py
        tok.save_pretrained(HERE / name)
        (HERE / name / "tokenizer.model").unlink()  # one shared copy; tests copy it in
        tok = AutoTokenizer.from_pretrained(HERE / name, use_fast=False, vocab_file=str(HERE / "tokenizer.model"))
        golden["cases"][name] = [
            {"query": q, "is_sentence": s, "answer": a, "ids": lisa_input_ids(tok, q, s, a)}
            for q, s in QUERIES for a in (True, False)]
        golden["cases"][name + "_seg"] = tok("[SEG]", add_special_tokens=False).input_ids
    (HERE / "golden.json").write_text(compact(golden))


if __name__ == "__main__":
    main()
