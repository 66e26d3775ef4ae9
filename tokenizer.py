"""The tokenizer: LLaMA's sentencepiece model (tokenizer.model) read and used, a small one trained for the built-in
tasks, copied into a run's folder, and checked against a model's vocabulary."""
import io
import os

from checkpoints import CheckpointError, atomic_write, resolve
from data import MARKERS, alpaca_prompt
from flags import FlagError


class Tokenizer:  # LLaMA's sentencepiece tokenizer (tokenizer.model)
    def __init__(self, path: str):
        import sentencepiece as spm
        self.path = path
        try:
            self.sp = spm.SentencePieceProcessor(model_file=path)
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"{path}: not a readable sentencepiece tokenizer ({str(e).splitlines()[0]})")
        self.vocab_size, self.bos_id, self.eos_id = self.sp.vocab_size(), self.sp.bos_id(), self.sp.eos_id()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])


def load_tokenizer(path: str) -> Tokenizer:
    """A tokenizer.model file, or a folder holding one."""
    path = os.path.join(resolve(path), "tokenizer.model") if os.path.isdir(path) else path
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such tokenizer file (pass --tokenizer path/to/tokenizer.model)")
    return Tokenizer(path)


def check_vocab(model, tokenizer: Tokenizer, where: str = "the checkpoint"):
    if model.args.vocab_size != tokenizer.vocab_size:
        raise CheckpointError(f"{tokenizer.path} has {tokenizer.vocab_size} tokens but {where} has "
                              f"{model.args.vocab_size}: pass the tokenizer the model was trained with")


def copy_tokenizer(source: str | None, init: str | None, path: str):
    """The tokenizer.model at source (a file, or a checkpoint folder holding one), else beside the weights `init`,
    copied to path."""
    beside = os.path.join(resolve(init), "tokenizer.model") if init else None
    source = source or (beside if beside and os.path.exists(beside) else None)
    if source is None:
        raise CheckpointError("--data needs a tokenizer: pass --tokenizer path/to/tokenizer.model (or an --init folder "
                              "holding one)")
    tokenizer = load_tokenizer(source)  # one clear line if it is not one
    if os.path.realpath(tokenizer.path) != os.path.realpath(path):
        with open(tokenizer.path, "rb") as f:
            atomic_write(path, f.read())


def train_tokenizer(records: list[dict], vocab_size: int, path: str):
    """A small LLaMA-style sentencepiece BPE (unk 0, bos 1, eos 2, digits split, byte fallback), written to path.
    The template's MARKERS are single tokens, so that a tiny model spends its compute on the instruction and the
    input, and so is a digit after a space ("▁7", two tokens for LLaMA): "1 2 4 7 9" is one token a step of sorting.
    """
    import sentencepiece as spm
    texts = [r["text"] if "text" in r else alpaca_prompt(r["instruction"], r["input"]) + r["output"] for r in records]
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
            split_digits=True, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
            normalization_rule_name="identity", remove_extra_whitespaces=False, num_threads=1, minloglevel=2,
            hard_vocab_limit=False,
            user_defined_symbols=[m.replace(" ", "\u2581") for m in MARKERS] + [f"\u2581{d}" for d in range(10)])
    except RuntimeError as e:  # e.g. fewer pieces than the 256 bytes + characters need
        raise FlagError(f"--vocab_size {vocab_size}: sentencepiece refused ({str(e).split('] ')[-1][:200]})")
    atomic_write(path, buf.getvalue())
